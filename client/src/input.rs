//! Tick files for `publish` and `replay`.
//!
//! - **CSV** with a header row. Columns are found by name (configurable):
//!   `symbol, ts, price, size, bid, ask, bid_size, ask_size`; `bid`… are optional
//!   (missing column or empty cell = absent). With `--symbol`, the file needs no
//!   symbol column.
//! - **NDJSON**: one JSON object per line with the same field names. Decimals
//!   must be JSON *strings* (`"price":"67012.50"`), so no float ever touches a
//!   price; `ts` may be a number or a string.
//!
//! `ts` is an integer or decimal in the unit given by `--ts-unit` (`us`, `ms`,
//! `s`, `ns`) and is converted exactly to microseconds.
//!
//! Real exchange exports write tiny sizes in scientific notation (`6.405e-05`);
//! the server only takes plain decimal strings, so such cells are rewritten
//! exactly (`0.00006405`) before sending. Nothing is ever rounded.

use std::{
    fs::File,
    io::{BufRead, BufReader},
    path::Path,
};

use simd_json::{OwnedValue, prelude::*};
use tickshard_proto::v1 as pb;
use tickshard_shard::domain::{Decimal, parse_decimal};

use super::ClientError;

#[derive(Clone, Debug)]
pub struct Columns {
    pub symbol: String,
    pub ts: String,
    pub price: String,
    pub size: String,
    pub bid: String,
    pub ask: String,
    pub bid_size: String,
    pub ask_size: String,
}

impl Columns {
    /// The eight names in field order: symbol, ts, price, size, bid, ask,
    /// bid_size, ask_size.
    pub fn names(&self) -> [&str; 8] {
        [
            &self.symbol,
            &self.ts,
            &self.price,
            &self.size,
            &self.bid,
            &self.ask,
            &self.bid_size,
            &self.ask_size,
        ]
    }
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            symbol: "symbol".into(),
            ts: "ts".into(),
            price: "price".into(),
            size: "size".into(),
            bid: "bid".into(),
            ask: "ask".into(),
            bid_size: "bid_size".into(),
            ask_size: "ask_size".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TsUnit {
    Micros,
    Millis,
    Seconds,
    Nanos,
}

impl TsUnit {
    pub fn parse(s: &str) -> Option<TsUnit> {
        Some(match s {
            "us" => TsUnit::Micros,
            "ms" => TsUnit::Millis,
            "s" => TsUnit::Seconds,
            "ns" => TsUnit::Nanos,
            _ => return None,
        })
    }

    /// The name [`TsUnit::parse`] takes.
    pub fn name(self) -> &'static str {
        match self {
            TsUnit::Micros => "us",
            TsUnit::Millis => "ms",
            TsUnit::Seconds => "s",
            TsUnit::Nanos => "ns",
        }
    }

    /// Converts a timestamp given as text in this unit to µs, exactly
    /// (sub-microsecond digits are truncated).
    pub fn to_micros(self, text: &str) -> Option<i64> {
        let d = parse_decimal(text.trim())?;
        let us = match self {
            TsUnit::Micros => d,
            TsUnit::Millis => d.checked_mul(Decimal::from(1_000))?,
            TsUnit::Seconds => d.checked_mul(Decimal::from(1_000_000))?,
            TsUnit::Nanos => d.checked_div(Decimal::from(1_000))?,
        };
        rust_decimal::prelude::ToPrimitive::to_i64(&us.trunc())
    }
}

/// `6.405e-05` → `0.00006405` (exact); anything else is passed through for the
/// server to validate.
pub fn plain_decimal(v: &str) -> String {
    if v.contains(['e', 'E'])
        && let Ok(d) = Decimal::from_scientific(v)
    {
        return d.to_string();
    }
    v.to_string()
}

#[derive(Clone, Debug)]
pub struct InputSpec {
    pub ndjson: bool,
    pub symbol: Option<String>,
    pub columns: Columns,
    pub ts_unit: TsUnit,
}

impl InputSpec {
    /// CSV unless the file is `.ndjson` / `.jsonl` (or `format` says otherwise).
    pub fn detect(path: &Path, format: Option<&str>) -> bool {
        match format {
            Some(f) => f == "ndjson",
            None => matches!(path.extension().and_then(|e| e.to_str()), Some("ndjson" | "jsonl")),
        }
    }
}

/// One row, or why it could not be read (with its line number).
pub type Row = Result<pb::Tick, String>;

/// Where the rows come from: a file, or any reader (tests, fuzzing).
type Input = Box<dyn std::io::Read + Send>;

enum Source {
    Csv {
        rdr: Box<csv::Reader<Input>>,
        idx: [Option<usize>; 8],
        rec: csv::StringRecord,
    },
    Ndjson {
        lines: std::io::Lines<BufReader<Input>>,
        line: u64,
    },
    /// The input failed to read (not a bad row: the file itself): that
    /// error was the last row, so a caller that skips bad rows ends.
    Failed,
}

/// Reads tick rows from a file, one at a time.
pub struct TickReader {
    spec: InputSpec,
    src: Source,
}

impl TickReader {
    pub fn open(path: &Path, spec: InputSpec) -> Result<TickReader, ClientError> {
        let file = File::open(path).map_err(|e| ClientError::Input(format!("{}: {e}", path.display())))?;
        TickReader::from_reader(Box::new(file), &path.display().to_string(), spec)
    }

    /// Rows from any reader; `name` names it in errors.
    pub fn from_reader(input: Input, name: &str, spec: InputSpec) -> Result<TickReader, ClientError> {
        let src = if spec.ndjson {
            Source::Ndjson {
                lines: BufReader::new(input).lines(),
                line: 0,
            }
        } else {
            let mut rdr = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(input);
            let headers = rdr
                .headers()
                .map_err(|e| ClientError::Input(format!("{name}: {e}")))?
                .clone();
            let find = |name: &str| headers.iter().position(|h| h == name);
            let c = &spec.columns;
            let idx = c.names().map(find);
            for (i, column) in [(1, &c.ts), (2, &c.price), (3, &c.size)] {
                if idx[i].is_none() {
                    return Err(ClientError::Input(format!(
                        "{name}: no column '{column}' (columns: {})",
                        headers.iter().collect::<Vec<_>>().join(",")
                    )));
                }
            }
            if idx[0].is_none() && spec.symbol.is_none() {
                return Err(ClientError::Input(format!(
                    "{name}: no column '{}'; give --symbol for files of one instrument",
                    c.symbol
                )));
            }
            Source::Csv {
                rdr: Box::new(rdr),
                idx,
                rec: csv::StringRecord::new(),
            }
        };
        Ok(TickReader { spec, src })
    }

    /// True once the input itself failed to read (the last row was that
    /// error): not a bad row, and nothing more will come.
    pub fn read_failed(&self) -> bool {
        matches!(self.src, Source::Failed)
    }

    fn tick(&self, get: impl Fn(usize) -> Option<String>, ts_raw: Option<String>, at: &str) -> Row {
        let symbol = match &self.spec.symbol {
            Some(s) => s.clone(),
            None => get(0).ok_or_else(|| format!("{at}: no symbol"))?,
        };
        let ts_raw = ts_raw.ok_or_else(|| format!("{at}: no ts"))?;
        let ts = self
            .spec
            .ts_unit
            .to_micros(&ts_raw)
            .ok_or_else(|| format!("{at}: ts '{ts_raw}' is not a number"))?;
        let dec = |i: usize| get(i).map(|v| plain_decimal(&v)).unwrap_or_default();
        Ok(pb::Tick {
            symbol,
            seq: 0,
            ts_micros: ts,
            price: dec(2),
            size: dec(3),
            bid: dec(4),
            ask: dec(5),
            bid_size: dec(6),
            ask_size: dec(7),
        })
    }
}

impl Iterator for TickReader {
    type Item = Row;

    fn next(&mut self) -> Option<Row> {
        match &mut self.src {
            Source::Csv { rdr, idx, rec } => {
                match rdr.read_record(rec) {
                    Ok(false) => return None,
                    Err(e) => {
                        let row = Some(Err(e.to_string()));
                        if matches!(e.kind(), csv::ErrorKind::Io(_)) {
                            self.src = Source::Failed;
                        }
                        return row;
                    }
                    Ok(true) => {}
                }
                let at = format!("line {}", rec.position().map_or(0, |p| p.line()));
                let (idx, rec) = (*idx, rec.clone());
                let get = |i: usize| {
                    idx[i]
                        .and_then(|c| rec.get(c))
                        .filter(|v| !v.is_empty())
                        .map(str::to_owned)
                };
                let ts = get(1);
                Some(self.tick(get, ts, &at))
            }
            Source::Failed => None,
            Source::Ndjson { lines, line } => loop {
                *line += 1;
                let text = match lines.next()? {
                    Ok(t) => t,
                    Err(e) => {
                        // (a line that is not UTF-8 is a bad row, and read past)
                        let row = Some(Err(format!("line {line}: {e}")));
                        if e.kind() != std::io::ErrorKind::InvalidData {
                            self.src = Source::Failed;
                        }
                        return row;
                    }
                };
                if text.trim().is_empty() {
                    continue;
                }
                let at = format!("line {line}");
                let mut buf = text.into_bytes();
                let v: OwnedValue = match simd_json::to_owned_value(&mut buf) {
                    Ok(v) => v,
                    Err(e) => return Some(Err(format!("{at}: {e}"))),
                };
                let c = self.spec.columns.clone();
                let names = c.names();
                for (i, n) in names.iter().enumerate().skip(2) {
                    if let Some(x) = v.get(*n)
                        && !x.is_str()
                        && !x.is_null()
                    {
                        let _ = i;
                        return Some(Err(format!(
                            "{at}: \"{n}\" must be a decimal string, not a JSON number"
                        )));
                    }
                }
                let get = |i: usize| {
                    v.get(names[i])
                        .and_then(|x| x.as_str())
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                };
                let ts = v.get(c.ts.as_str()).and_then(|x| {
                    x.as_str()
                        .map(str::to_owned)
                        .or_else(|| x.as_i64().map(|n| n.to_string()))
                        .or_else(|| x.as_u64().map(|n| n.to_string()))
                });
                return Some(self.tick(get, ts, &at));
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read error of the file itself is reported once and ends the rows
    /// (a caller that skips bad rows does not loop on it); a line that is
    /// not UTF-8 is a bad row and the next line is read.
    #[test]
    fn a_failing_input_ends_after_its_error() {
        struct Broken;
        impl std::io::Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("device gone"))
            }
        }
        let spec = InputSpec {
            ndjson: true,
            symbol: Some("X".into()),
            columns: Columns::default(),
            ts_unit: TsUnit::Micros,
        };
        let mut r = TickReader::from_reader(Box::new(Broken), "broken", spec.clone()).unwrap();
        assert!(matches!(r.next(), Some(Err(e)) if e.contains("device gone")));
        assert!(r.next().is_none());

        let text = b"\xff\xfe\n{\"ts\":1,\"price\":\"1.5\",\"size\":\"2\"}\n".to_vec();
        let mut r = TickReader::from_reader(Box::new(std::io::Cursor::new(text)), "t", spec).unwrap();
        assert!(matches!(r.next(), Some(Err(_))), "the line that is not UTF-8");
        assert!(matches!(r.next(), Some(Ok(t)) if t.price == "1.5"));
        assert!(r.next().is_none());
    }

    #[test]
    fn timestamp_units_convert_exactly() {
        assert_eq!(TsUnit::Millis.to_micros("1714617360123"), Some(1_714_617_360_123_000));
        assert_eq!(
            TsUnit::Seconds.to_micros("1714617360.123456"),
            Some(1_714_617_360_123_456)
        );
        assert_eq!(
            TsUnit::Nanos.to_micros("1714617360123456789"),
            Some(1_714_617_360_123_456)
        );
        assert_eq!(TsUnit::Micros.to_micros("12"), Some(12));
        assert_eq!(TsUnit::Micros.to_micros("x"), None);
    }

    #[test]
    fn scientific_notation_is_rewritten_exactly() {
        assert_eq!(plain_decimal("6.405e-05"), "0.00006405");
        assert_eq!(plain_decimal("1.39E-06"), "0.00000139");
        assert_eq!(plain_decimal("78319.0"), "78319.0");
        assert_eq!(plain_decimal("oops"), "oops");
    }

    #[test]
    fn csv_and_ndjson_rows() {
        let dir = tempfile_dir();
        let csv = dir.join("t.csv");
        std::fs::write(
            &csv,
            "trade_id,timestamp,price,amount\n1,1714617360123,58000.5,0.01\n2,1714617360124,58001,0.2\n",
        )
        .unwrap();
        let spec = InputSpec {
            ndjson: false,
            symbol: Some("BTC-USD".into()),
            columns: Columns {
                ts: "timestamp".into(),
                size: "amount".into(),
                ..Columns::default()
            },
            ts_unit: TsUnit::Millis,
        };
        let rows: Vec<_> = TickReader::open(&csv, spec).unwrap().collect::<Result<_, _>>().unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].price, "58000.5");
        assert_eq!(rows[1].ts_micros, 1_714_617_360_124_000);
        assert_eq!(rows[0].bid, "");

        let nd = dir.join("t.ndjson");
        std::fs::write(&nd, "{\"symbol\":\"ETH-USD\",\"ts\":5,\"price\":\"1.10\",\"size\":\"2\",\"bid\":\"1.0\"}\n\n{\"symbol\":\"X\",\"ts\":6,\"price\":1.1,\"size\":\"2\"}\n").unwrap();
        let spec = InputSpec {
            ndjson: true,
            symbol: None,
            columns: Columns::default(),
            ts_unit: TsUnit::Micros,
        };
        let rows: Vec<_> = TickReader::open(&nd, spec).unwrap().collect();
        assert_eq!(rows[0].as_ref().unwrap().bid, "1.0");
        assert!(rows[1].as_ref().unwrap_err().contains("decimal string"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("tickshard-input-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
