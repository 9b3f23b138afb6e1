#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tickshard_shard::fuzzing::tick_fields(data));
