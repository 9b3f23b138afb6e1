#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tickshard_client::fuzzing::tick_files(data));
