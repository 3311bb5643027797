#include "worker/nn/cuda/cuda_engine.h"

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/cuda/cuda_util.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "common/timer.h"
#include "worker/kernels/cuda/elementwise.h"
#include "worker/kernels/cuda/launch_util.h"
#include "worker/kernels/cuda/optimizer.h"
#include "worker/kernels/cuda/softmax_xent.h"
#include "worker/nn/cuda/gpu_layers.h"
#include "worker/nn/cuda/gpu_quant_layers.h"
#include "worker/nn/sequential.h"
#include "worker/quant/activation_quantizer.h"

namespace qtrain::nn::cuda {
namespace {

namespace kc = ::qtrain::kernels::cuda;
using qtrain::cuda::DeviceArray;

// Pinned host memory of n elements of T.
template <typename T>
class PinnedArray {
 public:
  PinnedArray() = default;
  PinnedArray(const PinnedArray&) = delete;
  PinnedArray& operator=(const PinnedArray&) = delete;
  ~PinnedArray() {
    if (data_ != nullptr) cudaFreeHost(data_);
  }
  absl::Status Allocate(size_t n) {
    void* p = nullptr;
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaMallocHost(&p, std::max<size_t>(n, 1) * sizeof(T)));
    data_ = static_cast<T*>(p);
    size_ = n;
    return absl::OkStatus();
  }
  T* data() { return data_; }
  size_t size() const { return size_; }

 private:
  T* data_ = nullptr;
  size_t size_ = 0;
};

int DeviceFromEnvironment() {
  for (const char* var : {"LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"}) {
    const char* v = std::getenv(var);
    int device = 0;
    if (v != nullptr && absl::SimpleAtoi(v, &device) && device >= 0) return device;
  }
  return 0;
}

// A captured step segment.
class Graph {
 public:
  Graph() = default;
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  ~Graph() {
    if (exec_ != nullptr) cudaGraphExecDestroy(exec_);
    if (graph_ != nullptr) cudaGraphDestroy(graph_);
  }
  bool ready() const { return exec_ != nullptr; }
  absl::Status Begin(cudaStream_t stream) {
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    return absl::OkStatus();
  }
  // Ends the capture begun on `stream`; `body` is the status of what was enqueued meanwhile.
  absl::Status End(cudaStream_t stream, absl::Status body) {
    cudaGraph_t g = nullptr;
    const cudaError_t end = cudaStreamEndCapture(stream, &g);
    if (!body.ok()) {
      if (g != nullptr) cudaGraphDestroy(g);
      return body;
    }
    QTRAIN_CUDA_RETURN_IF_ERROR(end);
    graph_ = g;
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaGraphInstantiate(&exec_, graph_, 0));
    return absl::OkStatus();
  }
  absl::Status Launch(cudaStream_t stream) {
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(exec_, stream));
    return absl::OkStatus();
  }

 private:
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
};

// One network on the device: its parameter state, compiled layers, loss gradient and optimizer.
struct Net {
  std::unique_ptr<DeviceState> state;
  std::unique_ptr<GpuLayer> root;
  GpuSequential* seq = nullptr;  // root, when guided training taps it
  train::Sgd* sgd = nullptr;
  DeviceArray<float> dlogits;
  DeviceArray<kc::SgdTensor> sgd_tensors;
  DeviceArray<kc::SgdChunk> sgd_chunks;
};

// A guidance point: Q (the low-bit network's activation quantizer there, or null) and the scratch
// for scale * (Q(mu) - nu) that Q's backward reads.
struct GuidePoint {
  std::unique_ptr<GpuLayer> q;
  DeviceArray<float> qdiff;
};

class CudaEngine : public train::StepEngine {
 public:
  static absl::StatusOr<std::unique_ptr<CudaEngine>> Create(const train::StepEngineInputs& in,
                                                            const CudaEngineOptions& options);

  std::string Describe() const override { return describe_; }
  absl::Status PushState() override;
  absl::Status PullState() override;

  absl::StatusOr<kernels::SoftmaxXentResult> TrainStep(const Tensor& x,
                                                       std::span<const int32_t> labels, float lr,
                                                       comm::StepStats* stats,
                                                       double* wait_seconds) override;
  absl::StatusOr<kernels::SoftmaxXentResult> EvalBatch(const Tensor& x,
                                                       std::span<const int32_t> labels) override;
  train::GuidedStepResult LastGuidedStep() const override { return last_guided_; }
  absl::StatusOr<kernels::SoftmaxXentResult> EvalTwinBatch(
      const Tensor& x, std::span<const int32_t> labels) override;

 private:
  explicit CudaEngine(const train::StepEngineInputs& in) : in_(in) {}

  struct Graphs {
    int eager_steps = 0;
    std::unique_ptr<Graph> front, back;  // [inputs, forward, loss, backward], [SGD, outputs]
  };

  // The device copy of a host model with gradient buckets `buckets`, planned for `max_input`.
  absl::StatusOr<Net> BuildNet(nn::Layer* model, const std::vector<Parameter*>& params,
                               const std::vector<Buffer*>& buffers,
                               const std::vector<train::GradientBucket>& buckets, train::Sgd* sgd,
                               const std::vector<std::string>& taps, const Shape& max_input,
                               Planner* planner);
  absl::Status BindGuidePoints(Planner* planner);
  absl::Status Stage(const Tensor& x, std::span<const int32_t> labels);
  // Enqueues the copy-in of the staged batch.
  absl::Status EnqueueInputs(int64_t m);
  // Forward of `net` (train or eval) and its loss into totals_[slot] (with its gradient in
  // training); `logits` gets the output.
  absl::Status EnqueueForwardLoss(Net& net, int64_t m, Mode mode, int slot, DeviceTensor* logits);
  // Training: inputs, forward, loss and backward of the network (and the twin and the guidance).
  absl::Status EnqueueFront(int64_t m);
  absl::Status EnqueueGuidance(const GpuPass& pass, int64_t m);
  absl::Status EnqueueBack();
  absl::Status AverageGradients(Net& net, comm::StepStats* stats);
  // Copies totals_ back (and the guidance sum when `guidance`); the result of totals_[slot].
  absl::StatusOr<kernels::SoftmaxXentResult> Results(int slot, bool guidance = false);
  // Forward in evaluation mode of `net`, its loss into totals_[slot].
  absl::StatusOr<kernels::SoftmaxXentResult> Eval(Net& net, int slot, const Tensor& x,
                                                  std::span<const int32_t> labels);

  train::StepEngineInputs in_;
  std::string describe_;
  CudaEngineOptions options_;
  qtrain::cuda::Stream stream_;
  Net net_;
  std::unique_ptr<Net> twin_;  // guided training
  std::vector<GuidePoint> points_;
  DeviceArray<uint8_t> workspace_, xent_workspace_;
  DeviceArray<float> x_, lr_;
  DeviceArray<int32_t> labels_;
  DeviceArray<kc::SoftmaxXentDeviceResult> totals_;  // [0] the network, [1] the twin
  DeviceArray<double> guidance_;                     // the step's sum of squares
  kc::SgdStepOptions sgd_step_;
  PinnedArray<float> host_x_, host_lr_, host_bucket_;
  PinnedArray<int32_t> host_labels_;
  PinnedArray<kc::SoftmaxXentDeviceResult> host_totals_;
  PinnedArray<double> host_guidance_;
  int64_t sample_elements_ = 0;
  int64_t classes_ = 0;
  train::GuidedStepResult last_guided_;
  absl::flat_hash_map<int64_t, Graphs> graphs_;  // by batch size
};

absl::StatusOr<Net> CudaEngine::BuildNet(nn::Layer* model, const std::vector<Parameter*>& params,
                                         const std::vector<Buffer*>& buffers,
                                         const std::vector<train::GradientBucket>& buckets,
                                         train::Sgd* sgd, const std::vector<std::string>& taps,
                                         const Shape& max_input, Planner* planner) {
  Net net;
  net.sgd = sgd;
  // Parameter storage with each gradient bucket contiguous.
  std::vector<DeviceState::BucketRange> ranges;
  std::vector<std::vector<std::pair<size_t, int64_t>>> members;
  int64_t at = 0;
  for (const train::GradientBucket& b : buckets) {
    ranges.push_back({b.key, at, b.elements});
    std::vector<std::pair<size_t, int64_t>> m;
    for (size_t k = 0; k < b.params.size(); ++k) m.push_back({b.params[k], b.offsets[k]});
    members.push_back(std::move(m));
    at += b.elements;
  }
  ASSIGN_OR_RETURN(net.state, DeviceState::Create(params, buffers, ranges, members));
  ASSIGN_OR_RETURN(net.root, CompileLayer(model, net.state.get()));
  if (!taps.empty()) {
    net.seq = dynamic_cast<GpuSequential*>(net.root.get());
    if (net.seq == nullptr) {
      return absl::InvalidArgumentError("guided training needs a Sequential model");
    }
    RETURN_IF_ERROR(net.seq->SetTaps(taps));
  }
  ASSIGN_OR_RETURN(Shape out, net.root->Plan(max_input, planner));
  if (out.size() != 2 || out[1] != in_.num_classes) {
    return absl::InvalidArgumentError(absl::StrCat("CudaEngine: the model's output is ",
                                                   ShapeToString(out), ", expected [N,",
                                                   in_.num_classes, "]"));
  }
  ASSIGN_OR_RETURN(net.dlogits,
                   DeviceArray<float>::Create(static_cast<size_t>(in_.max_batch * out[1])));
  // The optimizer's tensor list, in parameter order.
  std::vector<kc::SgdTensor> tensors;
  for (size_t i = 0; i < params.size(); ++i) {
    const Parameter* p = params[i];
    kc::SgdTensor t;
    t.param = net.state->value(p);
    t.grad = net.state->grad(p);
    t.momentum = net.state->momentum(i);
    t.size = p->value.size();
    t.lr_scale = p->lr_scale;
    t.group_lr_scale =
        p->kind == ParamKind::kQuantizer ? in_.sgd_options.quantizer_lr_scale : 1.0f;
    t.weight_decay = p->kind == ParamKind::kWeight ? in_.sgd_options.weight_decay : 0.0f;
    tensors.push_back(t);
  }
  ASSIGN_OR_RETURN(std::vector<kc::SgdChunk> chunks, kc::PlanSgdChunks(tensors));
  ASSIGN_OR_RETURN(net.sgd_tensors, DeviceArray<kc::SgdTensor>::Create(tensors.size()));
  RETURN_IF_ERROR(net.sgd_tensors.CopyFromHost(tensors));
  ASSIGN_OR_RETURN(net.sgd_chunks, DeviceArray<kc::SgdChunk>::Create(chunks.size()));
  RETURN_IF_ERROR(net.sgd_chunks.CopyFromHost(chunks));
  return net;
}

absl::Status CudaEngine::BindGuidePoints(Planner* planner) {
  const train::TwinInputs& twin = *in_.twin;
  auto* host = dynamic_cast<Sequential*>(in_.model);
  if (host == nullptr) return absl::InvalidArgumentError("guided training needs a Sequential model");
  points_.clear();
  points_.resize(twin.taps.size());
  for (size_t k = 0; k < twin.taps.size(); ++k) {
    GuidePoint& p = points_[k];
    const Shape& mu = twin_->seq->planned_tap_shape(static_cast<int>(k));
    const Shape& nu = net_.seq->planned_tap_shape(static_cast<int>(k));
    if (mu != nu) {
      return absl::InvalidArgumentError(absl::StrCat(
          "guidance point ", twin.taps[k], ": the twin's map is ", ShapeToString(mu),
          ", the low-bit network's ", ShapeToString(nu)));
    }
    for (int i = 0; i < host->num_children(); ++i) {
      Layer* child = &host->child(i);
      if (child->name() != twin.taps[k] ||
          dynamic_cast<quant::ActivationQuantizer*>(child) == nullptr) {
        continue;
      }
      // A second twin of the network's own quantizer: the same parameters on the device.
      ASSIGN_OR_RETURN(p.q, CompileQuantLayer(child, net_.state.get()));
      if (p.q == nullptr) return absl::InternalError("an activation quantizer without a twin");
      RETURN_IF_ERROR(p.q->Plan(mu, planner).status());
      ASSIGN_OR_RETURN(p.qdiff, DeviceArray<float>::Create(static_cast<size_t>(NumElements(mu))));
    }
  }
  return absl::OkStatus();
}

absl::Status CudaEngine::PushState() {
  RETURN_IF_ERROR(net_.state->Push(&net_.sgd->momentum(), stream_.get()));
  if (twin_ != nullptr) RETURN_IF_ERROR(twin_->state->Push(&twin_->sgd->momentum(), stream_.get()));
  return absl::OkStatus();
}

absl::Status CudaEngine::PullState() {
  RETURN_IF_ERROR(net_.state->Pull(&net_.sgd->momentum(), stream_.get()));
  if (twin_ != nullptr) RETURN_IF_ERROR(twin_->state->Pull(&twin_->sgd->momentum(), stream_.get()));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<CudaEngine>> CudaEngine::Create(const train::StepEngineInputs& in,
                                                               const CudaEngineOptions& options) {
  if (qtrain::cuda::DeviceCount() == 0) {
    return absl::FailedPreconditionError(
        "--device=cuda: no CUDA device is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)");
  }
  if (in.model == nullptr || in.sgd == nullptr || in.comm == nullptr || in.input_chw.size() != 3 ||
      in.num_classes < 1 || in.max_batch < 1 ||
      (in.twin != nullptr && (in.twin->model == nullptr || in.twin->sgd == nullptr ||
                              in.twin->taps.empty()))) {
    return absl::InvalidArgumentError("CudaEngine: incomplete StepEngineInputs");
  }
  auto e = std::unique_ptr<CudaEngine>(new CudaEngine(in));
  e->options_ = options;
  const int device = options.device >= 0 ? options.device : DeviceFromEnvironment();
  if (device >= qtrain::cuda::DeviceCount()) {
    return absl::InvalidArgumentError(absl::StrCat("CUDA device ", device, " requested but only ",
                                                   qtrain::cuda::DeviceCount(), " visible"));
  }
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  ASSIGN_OR_RETURN(std::string name, qtrain::cuda::DeviceName(device));
  ASSIGN_OR_RETURN(e->stream_, qtrain::cuda::Stream::Create());

  Planner planner;
  const Shape max_input = {in.max_batch, in.input_chw[0], in.input_chw[1], in.input_chw[2]};
  const std::vector<std::string> no_taps;
  ASSIGN_OR_RETURN(e->net_, e->BuildNet(in.model, in.params, in.buffers, in.buckets, in.sgd,
                                        in.twin != nullptr ? in.twin->taps : no_taps, max_input,
                                        &planner));
  if (in.twin != nullptr) {
    ASSIGN_OR_RETURN(Net twin, e->BuildNet(in.twin->model, in.twin->params, in.twin->buffers,
                                           in.twin->buckets, in.twin->sgd, in.twin->taps,
                                           max_input, &planner));
    e->twin_ = std::make_unique<Net>(std::move(twin));
    RETURN_IF_ERROR(e->BindGuidePoints(&planner));
    ASSIGN_OR_RETURN(e->guidance_, DeviceArray<double>::Create(1));
    // DiffScaledSumSquares runs on the shared workspace.
    planner.workspace_bytes = std::max<uint64_t>(planner.workspace_bytes,
                                                 kc::kReductionWorkspaceBytes);
    RETURN_IF_ERROR(e->host_guidance_.Allocate(1));
  }
  e->classes_ = in.num_classes;
  e->sample_elements_ = in.input_chw[0] * in.input_chw[1] * in.input_chw[2];
  const size_t max_x = static_cast<size_t>(in.max_batch * e->sample_elements_);
  ASSIGN_OR_RETURN(e->workspace_, DeviceArray<uint8_t>::Create(planner.workspace_bytes));
  ASSIGN_OR_RETURN(e->x_, DeviceArray<float>::Create(max_x));
  ASSIGN_OR_RETURN(e->labels_, DeviceArray<int32_t>::Create(static_cast<size_t>(in.max_batch)));
  ASSIGN_OR_RETURN(e->lr_, DeviceArray<float>::Create(1));
  ASSIGN_OR_RETURN(e->totals_, DeviceArray<kc::SoftmaxXentDeviceResult>::Create(2));
  ASSIGN_OR_RETURN(e->xent_workspace_,
                   DeviceArray<uint8_t>::Create(kc::SoftmaxXentWorkspaceBytes(in.max_batch)));
  RETURN_IF_ERROR(e->host_x_.Allocate(max_x));
  RETURN_IF_ERROR(e->host_labels_.Allocate(static_cast<size_t>(in.max_batch)));
  RETURN_IF_ERROR(e->host_lr_.Allocate(1));
  RETURN_IF_ERROR(e->host_totals_.Allocate(2));
  int64_t largest_bucket = 0;
  for (const auto& r : e->net_.state->buckets()) largest_bucket = std::max(largest_bucket, r.elements);
  if (e->twin_ != nullptr) {
    for (const auto& r : e->twin_->state->buckets()) {
      largest_bucket = std::max(largest_bucket, r.elements);
    }
  }
  if (!in.comm->SupportsDeviceBuffers()) {
    RETURN_IF_ERROR(e->host_bucket_.Allocate(static_cast<size_t>(largest_bucket)));
  }
  e->sgd_step_.momentum = in.sgd_options.momentum;
  e->sgd_step_.nesterov = in.sgd_options.nesterov;
  RETURN_IF_ERROR(kc::ValidateSgdStepOptions(e->sgd_step_));
  RETURN_IF_ERROR(e->PushState());
  e->describe_ = absl::StrCat("cuda device ", device, ": ", name, ", workspace ",
                              planner.workspace_bytes >> 20, " MiB, CUDA graphs ",
                              options.graphs ? "on" : "off",
                              e->twin_ != nullptr ? ", guided (full-precision twin on the device)"
                                                  : "");
  return e;
}

absl::Status CudaEngine::Stage(const Tensor& x, std::span<const int32_t> labels) {
  const int64_t m = x.dim(0);
  if (m < 1 || m > in_.max_batch || x.size() != m * sample_elements_ ||
      static_cast<int64_t>(labels.size()) != m) {
    return absl::InvalidArgumentError(absl::StrCat("CudaEngine: batch ", ShapeToString(x.shape()),
                                                   " with ", labels.size(),
                                                   " labels does not fit the plan"));
  }
  std::memcpy(host_x_.data(), x.data(), 4 * static_cast<size_t>(x.size()));
  std::memcpy(host_labels_.data(), labels.data(), 4 * labels.size());
  return absl::OkStatus();
}

absl::Status CudaEngine::EnqueueInputs(int64_t m) {
  cudaStream_t s = stream_.get();
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(x_.data(), host_x_.data(),
                                              4 * static_cast<size_t>(m * sample_elements_),
                                              cudaMemcpyHostToDevice, s));
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(labels_.data(), host_labels_.data(),
                                              4 * static_cast<size_t>(m), cudaMemcpyHostToDevice,
                                              s));
  return absl::OkStatus();
}

absl::Status CudaEngine::EnqueueForwardLoss(Net& net, int64_t m, Mode mode, int slot,
                                            DeviceTensor* logits) {
  GpuPass pass{CudaContext{stream_.get()}, mode, workspace_.data(), workspace_.size()};
  RETURN_IF_ERROR(net.root->Forward(
      pass, DeviceTensor{x_.data(), {m, in_.input_chw[0], in_.input_chw[1], in_.input_chw[2]}},
      logits));
  const bool train = mode == Mode::kTrain;
  return kc::SoftmaxCrossEntropy(pass.ctx, m, classes_, logits->data, labels_.data(),
                                 train ? net.dlogits.data() : nullptr, totals_.data() + slot,
                                 xent_workspace_.data());
}

absl::Status CudaEngine::EnqueueGuidance(const GpuPass& pass, int64_t m) {
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(guidance_.data(), 0, sizeof(double), pass.ctx.stream));
  const float scale = in_.twin->lambda / static_cast<float>(m);
  double* sum = guidance_.data();
  for (size_t k = 0; k < points_.size(); ++k) {
    const int tap = static_cast<int>(k);
    GuidePoint& p = points_[k];
    const DeviceTensor& mu = twin_->seq->tap(tap);
    const DeviceTensor& nu = net_.seq->tap(tap);
    const int64_t n = nu.size();
    if (p.q == nullptr) {
      RETURN_IF_ERROR(kc::DiffScaledSumSquares(pass.ctx, n, mu.data, nu.data, scale,
                                               twin_->seq->tap_grad(tap), net_.seq->tap_grad(tap),
                                               sum, pass.workspace));
      continue;
    }
    // Q runs before the network's own backward, which then rewrites the quantizer's parameter
    // gradients: the guidance term's contribution to them is discarded, as on the CPU.
    DeviceTensor qmu;
    RETURN_IF_ERROR(p.q->Forward(pass, mu, &qmu));
    RETURN_IF_ERROR(kc::DiffScaledSumSquares(pass.ctx, n, qmu.data, nu.data, scale,
                                             p.qdiff.data(), net_.seq->tap_grad(tap), sum,
                                             pass.workspace));
    DeviceTensor dmu{twin_->seq->tap_grad(tap), mu.shape};
    RETURN_IF_ERROR(p.q->Backward(pass, DeviceTensor{p.qdiff.data(), mu.shape}, &dmu));
    if (dmu.data != twin_->seq->tap_grad(tap)) {  // a layer may answer in its own buffer
      QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(twin_->seq->tap_grad(tap), dmu.data,
                                                  4 * static_cast<size_t>(n),
                                                  cudaMemcpyDeviceToDevice, pass.ctx.stream));
    }
  }
  return absl::OkStatus();
}

absl::Status CudaEngine::EnqueueFront(int64_t m) {
  RETURN_IF_ERROR(EnqueueInputs(m));
  GpuPass pass{CudaContext{stream_.get()}, Mode::kTrain, workspace_.data(), workspace_.size()};
  DeviceTensor logits, twin_logits;
  RETURN_IF_ERROR(EnqueueForwardLoss(net_, m, Mode::kTrain, 0, &logits));
  if (twin_ != nullptr) {
    RETURN_IF_ERROR(EnqueueForwardLoss(*twin_, m, Mode::kTrain, 1, &twin_logits));
    RETURN_IF_ERROR(EnqueueGuidance(pass, m));
  }
  RETURN_IF_ERROR(net_.root->Backward(pass, DeviceTensor{net_.dlogits.data(), {m, classes_}},
                                      nullptr));
  if (twin_ != nullptr) {
    RETURN_IF_ERROR(twin_->root->Backward(
        pass, DeviceTensor{twin_->dlogits.data(), {m, classes_}}, nullptr));
  }
  return absl::OkStatus();
}

absl::Status CudaEngine::EnqueueBack() {
  cudaStream_t s = stream_.get();
  QTRAIN_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(lr_.data(), host_lr_.data(), 4, cudaMemcpyHostToDevice, s));
  for (Net* net : {&net_, twin_.get()}) {
    if (net == nullptr) continue;
    RETURN_IF_ERROR(kc::SgdStepMultiTensor(CudaContext{s}, sgd_step_, lr_.data(),
                                           net->sgd_tensors.data(), net->sgd_chunks.data(),
                                           static_cast<int64_t>(net->sgd_chunks.size())));
  }
  return absl::OkStatus();
}

absl::Status CudaEngine::AverageGradients(Net& net, comm::StepStats* stats) {
  comm::Communicator* comm = in_.comm;
  if (comm->IsIdentity()) return absl::OkStatus();
  cudaStream_t s = stream_.get();
  for (const DeviceState::BucketRange& b : net.state->buckets()) {
    float* d = net.state->grads() + b.offset;
    if (comm->SupportsDeviceBuffers()) {
      RETURN_IF_ERROR(comm->AllReduceMeanDevice(b.key, d, static_cast<size_t>(b.elements), s,
                                                stats));
      continue;
    }
    const size_t bytes = 4 * static_cast<size_t>(b.elements);
    QTRAIN_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(host_bucket_.data(), d, bytes, cudaMemcpyDeviceToHost, s));
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
    RETURN_IF_ERROR(comm->AllReduceMean(
        b.key, std::span<float>(host_bucket_.data(), static_cast<size_t>(b.elements)), stats));
    QTRAIN_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(d, host_bucket_.data(), bytes, cudaMemcpyHostToDevice, s));
  }
  return absl::OkStatus();
}

absl::StatusOr<kernels::SoftmaxXentResult> CudaEngine::Results(int slot, bool guidance) {
  cudaStream_t s = stream_.get();
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_totals_.data(), totals_.data(),
                                              2 * sizeof(kc::SoftmaxXentDeviceResult),
                                              cudaMemcpyDeviceToHost, s));
  if (guidance) {
    QTRAIN_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_guidance_.data(), guidance_.data(),
                                                sizeof(double), cudaMemcpyDeviceToHost, s));
  }
  QTRAIN_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
  return kc::SoftmaxXentResultFromDevice(host_totals_.data()[slot], classes_);
}

absl::StatusOr<kernels::SoftmaxXentResult> CudaEngine::TrainStep(const Tensor& x,
                                                                 std::span<const int32_t> labels,
                                                                 float lr, comm::StepStats* stats,
                                                                 double* wait_seconds) {
  RETURN_IF_ERROR(Stage(x, labels));
  *host_lr_.data() = lr;
  const int64_t m = x.dim(0);
  cudaStream_t s = stream_.get();
  Graphs& g = graphs_[m];
  if (options_.graphs && g.front == nullptr && g.eager_steps >= 1) {
    // Capture this step's two segments, then launch them below.
    g.front = std::make_unique<Graph>();
    RETURN_IF_ERROR(g.front->Begin(s));
    RETURN_IF_ERROR(g.front->End(s, EnqueueFront(m)));
    g.back = std::make_unique<Graph>();
    RETURN_IF_ERROR(g.back->Begin(s));
    RETURN_IF_ERROR(g.back->End(s, EnqueueBack()));
  }
  if (g.front != nullptr) {
    RETURN_IF_ERROR(g.front->Launch(s));
  } else {
    RETURN_IF_ERROR(EnqueueFront(m));
  }
  Timer wait;
  RETURN_IF_ERROR(AverageGradients(net_, stats));
  if (twin_ != nullptr) RETURN_IF_ERROR(AverageGradients(*twin_, stats));
  if (!in_.comm->IsIdentity()) *wait_seconds += wait.Seconds();
  if (g.back != nullptr) {
    RETURN_IF_ERROR(g.back->Launch(s));
  } else {
    RETURN_IF_ERROR(EnqueueBack());
    ++g.eager_steps;
  }
  ASSIGN_OR_RETURN(kernels::SoftmaxXentResult r, Results(0, /*guidance=*/twin_ != nullptr));
  if (twin_ != nullptr) {
    last_guided_.lowbit = r;
    ASSIGN_OR_RETURN(last_guided_.fp,
                     kc::SoftmaxXentResultFromDevice(host_totals_.data()[1], classes_));
    last_guided_.guidance = 0.5 * *host_guidance_.data() / static_cast<double>(m);
  }
  return r;
}

absl::StatusOr<kernels::SoftmaxXentResult> CudaEngine::Eval(Net& net, int slot, const Tensor& x,
                                                            std::span<const int32_t> labels) {
  RETURN_IF_ERROR(Stage(x, labels));
  RETURN_IF_ERROR(EnqueueInputs(x.dim(0)));
  DeviceTensor logits;
  RETURN_IF_ERROR(EnqueueForwardLoss(net, x.dim(0), Mode::kEval, slot, &logits));
  return Results(slot);
}

absl::StatusOr<kernels::SoftmaxXentResult> CudaEngine::EvalBatch(const Tensor& x,
                                                                 std::span<const int32_t> labels) {
  return Eval(net_, 0, x, labels);
}

absl::StatusOr<kernels::SoftmaxXentResult> CudaEngine::EvalTwinBatch(
    const Tensor& x, std::span<const int32_t> labels) {
  if (twin_ == nullptr) {
    return absl::FailedPreconditionError("CudaEngine: EvalTwinBatch without a twin");
  }
  return Eval(*twin_, 1, x, labels);
}

}  // namespace

train::StepEngineFactory CudaEngineFactory(const CudaEngineOptions& options) {
  return [options](const train::StepEngineInputs& in)
             -> absl::StatusOr<std::unique_ptr<train::StepEngine>> {
    ASSIGN_OR_RETURN(std::unique_ptr<CudaEngine> e, CudaEngine::Create(in, options));
    return std::unique_ptr<train::StepEngine>(std::move(e));
  };
}

}  // namespace qtrain::nn::cuda
