// Test-only: the largest single allocation through global operator new since the last reset.
// Linking largest_allocation.cc into a test binary replaces the global operator new/delete
// (one call to an atomic per allocation). Lets tests check that a decoder rejects a huge
// declared size before it allocates anything of that size.
#ifndef QTRAIN_TESTS_UNIT_WORKER_DATA_LARGEST_ALLOCATION_H_
#define QTRAIN_TESTS_UNIT_WORKER_DATA_LARGEST_ALLOCATION_H_

#include <cstddef>

namespace qtrain::data::test_util {

void ResetLargestAllocation();
size_t LargestAllocation();

}  // namespace qtrain::data::test_util

#endif  // QTRAIN_TESTS_UNIT_WORKER_DATA_LARGEST_ALLOCATION_H_
