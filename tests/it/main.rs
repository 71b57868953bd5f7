mod harness_selftest;
mod support;
