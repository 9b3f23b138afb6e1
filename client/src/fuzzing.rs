//! The entry point of the `tick_files` fuzz target in `fuzz/` (see its
//! README). It may not panic.

use tickshard_shard::wire;

use crate::input::{Columns, InputSpec, TickReader, TsUnit};

/// A CSV or NDJSON tick file: every row read or refused with a message.
/// Input: one flags byte (NDJSON, a fixed symbol, the ts unit), then the file.
pub fn tick_files(data: &[u8]) {
    let Some((&flags, file)) = data.split_first() else {
        return;
    };
    let spec = InputSpec {
        ndjson: flags & 1 != 0,
        symbol: (flags & 2 != 0).then(|| "FUZZ".to_string()),
        columns: Columns::default(),
        ts_unit: [TsUnit::Micros, TsUnit::Millis, TsUnit::Seconds, TsUnit::Nanos][usize::from(flags >> 2 & 3)],
    };
    let Ok(rows) = TickReader::from_reader(Box::new(std::io::Cursor::new(file.to_vec())), "fuzz", spec) else {
        return;
    };
    for t in rows.take(10_000).flatten() {
        let _ = wire::tick_from_pb(&t);
    }
}
