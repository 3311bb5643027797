// Packed inference: runs an exported model (packed_format.h) on the project's low-bit kernels.
//
// LoadPackedModel rebuilds the network from the file's model name, input shape, class count and
// quantization config (nn::BuildModel with a QuantLayerFactory, so layers and shapes are those of
// the fake-quantized model), checks that the file's layers match it one to one, and loads the
// full-precision tensors and activation-quantizer parameters into it. Predict then walks the
// network as its Forward would, except for every quantized Conv2d / Linear:
//   - input on an activation codebook (the usual case: a PACT / DoReFa / QIL quantizer feeds it,
//     possibly through max pooling and flattening): the input is turned into uint8 codes
//     (ActivationCode; exact), unfolded (im2col on codes; zero padding is code 0, which is the
//     value 0 for every activation quantizer) and multiplied on kernels::LowbitLinearForward with
//     the stored per-row affine map and the activation scale: the popcount kernel on bit planes
//     when both operands have 1..2 bits, the integer kernel on bytes otherwise. D and S are exact
//     integers; the epilogue is evaluated in double and rounded once.
//   - full-precision input (e.g. --aq=none, or a quantized first layer reading images): the FP32
//     kernels on the dequantized weight, which equals the fake-quantized weight bit for bit.
//   Power-of-two weights (PackedWeight.code_values, `--wq=pow2:levels=L`): the stored level index
//     becomes the unsigned integer q + 2^b for the level alpha * q (0..2^(b+1): 2 bits for 3
//     levels, 3 for 5, 4 for 7, 5 for 9) with wscale = alpha and wzero = -2^b alpha, so they run
//     on the same kernels (popcount for 3 levels behind an activation of <= 2 bits). L-DNQ
//     results keep full-precision activations, so all their layers take the FP32 path.
// Batch norm (eval mode), pooling, ReLUs, activation quantizers, the full-precision first and
// last layers and the residual adds run on the existing layers, in eval mode.
// Predictions therefore equal the fake-quantized model's; logits differ only by float summation
// order (~1e-6 relative).
//
// Thread-safety: Predict keeps scratch buffers, so one thread at a time per PackedModel (its
// kernels use the pool in the CpuContext). Cost: per image, the integer work of the quantized
// layers (wbits*abits*M*K/64 word ops for popcount layers, M*K multiply-adds for integer ones) plus
// the FP32 layers, an input-to-code pass and an im2col on bytes per packed convolution.
#ifndef QTRAIN_WORKER_QUANT_PACKED_MODEL_H_
#define QTRAIN_WORKER_QUANT_PACKED_MODEL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/packed_model.pb.h"
#include "worker/kernels/cpu/cpu_context.h"
#include "worker/nn/sequential.h"

namespace qtrain::quant {

class PackedWeightOp;  // one packed Conv2d / Linear (packed_model.cc)

class PackedModel {
 public:
  ~PackedModel();
  PackedModel(const PackedModel&) = delete;
  PackedModel& operator=(const PackedModel&) = delete;

  // logits[n, num_classes()] for images[n, C, H, W] (normalized as for training).
  // Precondition (checked): n >= 1, pointers non-null.
  void Predict(const kernels::CpuContext& cpu, const float* images, int64_t n, float* logits);

  const std::string& model_name() const { return header_.model(); }
  const nn::Shape& input_shape() const { return input_; }
  int num_classes() const { return header_.num_classes(); }
  const std::string& quant_config() const { return header_.quant_config(); }
  const std::string& settings() const { return header_.settings(); }
  // One line per packed layer: how it runs ("conv2: lowbit W2A2 popcount 32x288" / "fp32").
  std::string Describe() const;

 private:
  friend absl::StatusOr<std::unique_ptr<PackedModel>> LoadPackedModel(const std::string& path);
  PackedModel();

  void Run(nn::RunContext& ctx, nn::Layer& layer, const nn::Tensor& x, nn::Tensor* y);
  void RunResidual(nn::RunContext& ctx, nn::Layer& layer, const nn::Tensor& x, nn::Tensor* y);
  std::vector<nn::Tensor>& Scratch(const nn::Layer* layer, size_t count);

  pb::PackedModel header_;  // the file without its layers
  nn::Shape input_;
  std::unique_ptr<nn::Sequential> net_;
  std::unordered_map<const nn::Layer*, std::unique_ptr<PackedWeightOp>> ops_;
  std::vector<const PackedWeightOp*> op_order_;
  std::unordered_map<const nn::Layer*, std::vector<nn::Tensor>> scratch_;
  nn::Tensor input_tensor_, logits_;
};

// Reads and checks the file (DATA_LOSS / FAILED_PRECONDITION from the framing, naming the file;
// DATA_LOSS for a body whose layers are inconsistent with themselves, e.g. a code string of the
// wrong length; INVALID_ARGUMENT when its layers do not match the network its header describes,
// naming the first difference). Cost: one read of the file and one model build.
absl::StatusOr<std::unique_ptr<PackedModel>> LoadPackedModel(const std::string& path);

}  // namespace qtrain::quant

#endif  // QTRAIN_WORKER_QUANT_PACKED_MODEL_H_
