#include "worker/comm/communicator.h"

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
