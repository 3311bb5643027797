// Bounds-checked LSB-first bit streams and Elias gamma codes, for the codecs in compression/.
//
// Bit order: bit k of a stream is bit (k % 8) of byte k / 8 (little-endian, least significant bit
// first); a multi-bit field is stored least significant bit first.
//
// Elias gamma code of x >= 1, with N = floor(log2(x)): N zero bits, a one bit, then the N bits of
// x below its leading one, least significant first. (The classic code writes those N bits most
// significant first; this order matches the stream's, so a reader takes them as one field. The
// length, 2N + 1 bits, and the prefix-freeness are the classic code's.)
//
// Neither class allocates or ever touches memory outside the span it was given. The writer drops
// bits past its capacity and reports overflowed(); the reader refuses reads past the end.
// Thread-safety: neither is thread-safe. Cost: a few integer operations per field.
#ifndef QTRAIN_COMPRESSION_BIT_STREAM_H_
#define QTRAIN_COMPRESSION_BIT_STREAM_H_

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace qtrain::compression {

static_assert(std::endian::native == std::endian::little,
              "bit streams copy little-endian words with memcpy");

// Readers refuse gamma codes with more leading zeros than this (values of 2^33 or more).
inline constexpr int kMaxGammaLeadingZeros = 32;

// Length in bits of the gamma code of x (x >= 1).
inline int GammaBits(uint64_t x) { return 2 * (63 - std::countl_zero(x)) + 1; }

class BitWriter {
 public:
  // Writes into data[0, size). Bytes are written in order and the caller need not clear the
  // buffer. While 8 bytes of room remain, each write stores a whole 64-bit word (the bytes past
  // the stream's end hold zeros until later writes fill them).
  BitWriter(uint8_t* data, size_t size) : data_(data), size_(size) {}

  // Appends the low `count` bits of `bits` (count in [0, 56]; the bits above count are zero).
  void Write(uint64_t bits, int count) {
    // Work in locals and store the members after the byte store: data_ may alias anything, so
    // members read after it would have to come back from memory.
    uint64_t acc = acc_ | (bits << filled_);
    const int filled = filled_ + count;  // <= 63
    const size_t pos = pos_;
    const int full = filled >> 3;
    if (pos <= size_ && size_ - pos >= 8) {  // (not pos + 8: no wraparound to reason about)
      std::memcpy(data_ + pos, &acc, 8);
    } else {
      for (int k = 0; k < full; ++k) {
        if (pos + k < size_) {
          data_[pos + k] = static_cast<uint8_t>(acc >> (8 * k));
        } else {
          overflowed_ = true;
        }
      }
    }
    pos_ = pos + full;
    acc_ = acc >> (8 * full);  // full <= 7
    filled_ = filled & 7;
  }

  // Appends the gamma code of x, 1 <= x < 2^32.
  void WriteGamma(uint32_t x) {
    const int n = 31 - std::countl_zero(x);
    const uint64_t low = x ^ (uint32_t{1} << n);  // the n bits below the leading one
    if (2 * n + 1 <= 56) {
      Write((low << (n + 1)) | (uint64_t{1} << n), 2 * n + 1);
    } else {
      Write(uint64_t{1} << n, n + 1);  // n zeros and the one
      Write(low, n);
    }
  }

  // Pads the partial byte with zero bits and writes it. Returns the stream's length in bytes,
  // ceil(bits / 8). Call once, at the end.
  size_t Finish() {
    if (filled_ > 0) {
      if (pos_ < size_) {
        data_[pos_] = static_cast<uint8_t>(acc_);
      } else {
        overflowed_ = true;
      }
      ++pos_;
      acc_ = 0;
      filled_ = 0;
    }
    return pos_;
  }

  uint64_t bits_written() const { return 8 * uint64_t{pos_} + filled_; }
  // True if any bit fell past the end of the buffer (those bits were dropped).
  bool overflowed() const { return overflowed_; }

 private:
  uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;    // whole bytes written
  uint64_t acc_ = 0;  // pending bits, LSB first
  int filled_ = 0;    // pending bit count, < 8 between calls
  bool overflowed_ = false;
};

class BitReader {
 public:
  enum class GammaResult { kOk, kOverrun, kTooLong };

  BitReader(const uint8_t* data, size_t size) : data_(data), size_(size) {}

  uint64_t position() const { return pos_; }
  uint64_t bit_size() const { return 8 * uint64_t{size_}; }
  uint64_t remaining() const { return bit_size() - pos_; }

  // Reads `count` bits (count in [0, 32]) into *bits. Returns false, consuming nothing, if fewer
  // than `count` bits remain.
  bool Read(int count, uint32_t* bits) {
    if (static_cast<uint64_t>(count) > remaining()) return false;
    *bits = static_cast<uint32_t>(Peek() & ((uint64_t{1} << count) - 1));
    pos_ += count;
    return true;
  }

  // Skips `count` bits. Returns false, consuming nothing, if fewer remain.
  bool Skip(uint64_t count) {
    if (count > remaining()) return false;
    pos_ += count;
    return true;
  }

  // Reads one gamma code into *x. kOverrun: the stream ends inside the code (nothing consumed).
  // kTooLong: more than kMaxGammaLeadingZeros leading zeros (nothing consumed).
  GammaResult ReadGamma(uint64_t* x) {
    const uint64_t rem = remaining();
    const uint64_t window = Peek();  // >= 57 valid bits, zeros past the end
    if (window == 0) {
      return rem <= kPeekBits ? GammaResult::kOverrun : GammaResult::kTooLong;
    }
    const int n = std::countr_zero(window);
    if (n > kMaxGammaLeadingZeros) return GammaResult::kTooLong;
    if (uint64_t{2} * n + 1 > rem) return GammaResult::kOverrun;
    pos_ += n + 1;
    const uint64_t low = n == 0 ? 0 : Peek() & ((uint64_t{1} << n) - 1);
    pos_ += n;
    *x = (uint64_t{1} << n) | low;
    return GammaResult::kOk;
  }

  // The next 57 or more bits from the position, LSB first; bits past the end read as zero.
  uint64_t Peek() const {
    const uint64_t byte = pos_ >> 3;
    uint64_t word = 0;
    if (byte + 8 <= size_) {
      std::memcpy(&word, data_ + byte, 8);
    } else if (byte < size_) {
      std::memcpy(&word, data_ + byte, size_ - byte);
    }
    return word >> (pos_ & 7);
  }
  static constexpr uint64_t kPeekBits = 57;

  // Consumes `count` bits the caller has checked are there (count <= remaining()).
  void Advance(uint64_t count) { pos_ += count; }

  // True if every bit from the position to the end of the stream is zero.
  bool RestIsZero() const {
    const uint64_t byte = pos_ >> 3;
    if (byte >= size_) return true;
    if ((data_[byte] >> (pos_ & 7)) != 0) return false;
    for (size_t i = byte + 1; i < size_; ++i) {
      if (data_[i] != 0) return false;
    }
    return true;
  }

 private:
  const uint8_t* data_;
  size_t size_;
  uint64_t pos_ = 0;  // bits consumed
};

}  // namespace qtrain::compression

#endif  // QTRAIN_COMPRESSION_BIT_STREAM_H_
