#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| overlay_fuzz_harness::flow_filter(data));
