#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tickshard_feed::fuzzing::grpc_requests(data));
