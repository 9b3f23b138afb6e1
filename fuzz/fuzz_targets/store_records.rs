#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tickshard_shard::fuzzing::store_records(data));
