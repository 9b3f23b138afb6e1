#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tickshard_feed::fuzzing::tick_files(data));
