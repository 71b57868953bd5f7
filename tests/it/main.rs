mod chunks;
mod harness_selftest;
mod interop;
mod pull;
mod support;
