// libFuzzer target for the onebit decoder (and its encoder's own payloads); see decode_fuzzer.h.
#include "tests/fuzz/decode_fuzzer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return qtrain::compression::FuzzCodec("onebit", data, size);
}
