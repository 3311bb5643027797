// CRC-32 (the zlib / IEEE 802.3 polynomial) of a byte range, for payload and file checksums.
// Thread-safe. Cost: one pass (zlib's table-driven implementation).
#ifndef QTRAIN_COMMON_CRC32_H_
#define QTRAIN_COMMON_CRC32_H_

#include <cstddef>
#include <cstdint>

namespace qtrain {

uint32_t Crc32(const void* data, size_t size);

}  // namespace qtrain

#endif  // QTRAIN_COMMON_CRC32_H_
