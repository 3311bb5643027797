// Unsigned LEB128 varints of 32-bit values, as the threshold codec's payload uses them: 7 bits per
// byte, least significant group first, the high bit of a byte set when another byte follows.
// A value takes 1 byte below 2^7, 2 below 2^14, 3 below 2^21, 4 below 2^28 and 5 otherwise.
//
// The parser reads only within [p, end) and accepts exactly the encodings PutVarint32 writes:
// no more than 5 bytes, no value of 2^32 or more, and no redundant trailing zero group (so every
// value has one encoding). Internal to compression/. Thread-safe (pure functions).
#ifndef QTRAIN_COMPRESSION_VARINT_H_
#define QTRAIN_COMPRESSION_VARINT_H_

#include <cstddef>
#include <cstdint>

namespace qtrain::compression {

inline constexpr size_t kMaxVarint32Bytes = 5;

// Writes `value` at `dst`, which has room for kMaxVarint32Bytes; returns the bytes written.
inline size_t PutVarint32(uint8_t* dst, uint32_t value) {
  size_t k = 0;
  while (value >= 0x80) {
    dst[k++] = static_cast<uint8_t>(value | 0x80);
    value >>= 7;
  }
  dst[k++] = static_cast<uint8_t>(value);
  return k;
}

enum class VarintStatus {
  kOk,
  kTruncated,     // the input ends inside the varint
  kTooLong,       // a 5th byte still has its continuation bit set
  kOverflow,      // the 5th byte sets bits beyond bit 31
  kNonCanonical,  // a multi-byte varint ends with a zero group (a shorter encoding exists)
};

inline const char* VarintStatusName(VarintStatus status) {
  switch (status) {
    case VarintStatus::kOk:
      return "ok";
    case VarintStatus::kTruncated:
      return "truncated varint";
    case VarintStatus::kTooLong:
      return "varint longer than 5 bytes";
    case VarintStatus::kOverflow:
      return "varint value over 32 bits";
    case VarintStatus::kNonCanonical:
      return "non-canonical varint (redundant zero group)";
  }
  return "unknown varint error";
}

// Parses one varint from [p, end). On kOk sets *value and *size (bytes consumed).
inline VarintStatus ParseVarint32(const uint8_t* p, const uint8_t* end, uint32_t* value,
                                  size_t* size) {
  uint32_t result = 0;
  for (size_t k = 0; k < kMaxVarint32Bytes; ++k) {
    if (p + k == end) return VarintStatus::kTruncated;
    const uint32_t byte = p[k];
    if (k == kMaxVarint32Bytes - 1) {
      if (byte & 0x80) return VarintStatus::kTooLong;
      if (byte > 0x0f) return VarintStatus::kOverflow;
    }
    result |= (byte & 0x7f) << (7 * k);
    if ((byte & 0x80) == 0) {
      if (byte == 0 && k > 0) return VarintStatus::kNonCanonical;
      *value = result;
      *size = k + 1;
      return VarintStatus::kOk;
    }
  }
  return VarintStatus::kTooLong;  // not reached: the 5th byte returns above
}

}  // namespace qtrain::compression

#endif  // QTRAIN_COMPRESSION_VARINT_H_
