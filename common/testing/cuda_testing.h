// GoogleTest helpers for GPU tests. A GPU test starts with QTRAIN_REQUIRE_GPU(); where no CUDA
// device exists the test is reported as skipped (ctest shows it as "Skipped" through the
// SKIP_REGULAR_EXPRESSION that qtrain_add_gpu_test sets), never as passed.
#ifndef QTRAIN_COMMON_TESTING_CUDA_TESTING_H_
#define QTRAIN_COMMON_TESTING_CUDA_TESTING_H_

#include "common/cuda/cuda_util.h"
#include "gtest/gtest.h"

#define QTRAIN_REQUIRE_GPU()                                          \
  do {                                                                \
    if (::qtrain::cuda::DeviceCount() == 0) {                         \
      GTEST_SKIP() << "no CUDA device on this machine";               \
    }                                                                 \
  } while (false)

#endif  // QTRAIN_COMMON_TESTING_CUDA_TESTING_H_
