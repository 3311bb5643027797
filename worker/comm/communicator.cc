#include "worker/comm/communicator.h"

#include "absl/strings/str_cat.h"

namespace qtrain::comm {

StepStats& StepStats::operator+=(const StepStats& other) {
  encode_seconds += other.encode_seconds;
  communicate_seconds += other.communicate_seconds;
  decode_seconds += other.decode_seconds;
  bytes_sent += other.bytes_sent;
  bytes_received += other.bytes_received;
  calls += other.calls;
  return *this;
}

absl::StatusOr<AllreduceAlgorithm> ParseAllreduceAlgorithm(std::string_view name) {
  if (name == "auto") return AllreduceAlgorithm::kAuto;
  if (name == "allgather") return AllreduceAlgorithm::kAllgather;
  if (name == "reduce_scatter") return AllreduceAlgorithm::kReduceScatter;
  return absl::InvalidArgumentError(absl::StrCat("unknown --allreduce algorithm '",
                                                 std::string(name),
                                                 "'; valid: auto, allgather, reduce_scatter"));
}

const char* AllreduceAlgorithmName(AllreduceAlgorithm algorithm) {
  switch (algorithm) {
    case AllreduceAlgorithm::kAuto:
      return "auto";
    case AllreduceAlgorithm::kAllgather:
      return "allgather";
    case AllreduceAlgorithm::kReduceScatter:
      return "reduce_scatter";
  }
  return "?";
}

AllreduceAlgorithm ResolveAllreduceAlgorithm(AllreduceAlgorithm requested, int world_size,
                                             uint64_t n) {
  constexpr int kAutoAllgatherMaxWorld = 4;
  constexpr uint64_t kAutoAllgatherMaxBucketBytes = uint64_t{1} << 20;
  if (requested != AllreduceAlgorithm::kAuto) return requested;
  if (world_size <= kAutoAllgatherMaxWorld || 4 * n < kAutoAllgatherMaxBucketBytes) {
    return AllreduceAlgorithm::kAllgather;
  }
  return AllreduceAlgorithm::kReduceScatter;
}

absl::Status Communicator::AllReduceMeanDevice(std::string_view key, float* d_data, size_t n,
                                               void* cuda_stream, StepStats* stats) {
  return absl::UnimplementedError(
      "AllReduceMeanDevice: this communicator works on host buffers only (see "
      "SupportsDeviceBuffers)");
}

absl::StatusOr<double> Communicator::AllReduceSumScalar(double value) {
  double values[1] = {value};
  absl::Status status = AllReduceSum(values);
  if (!status.ok()) return status;
  return values[0];
}

}  // namespace qtrain::comm
