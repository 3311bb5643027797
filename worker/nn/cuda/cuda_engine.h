// `qtrain --device=cuda`: the training step on one GPU (train::StepEngine).
//
// The host model is compiled into GPU layers (gpu_layers.h) that run the project's CUDA kernels on
// device copies of the parameters, buffers and SGD momentum. A step is: copy the batch (through a
// pinned staging buffer) to the device, forward, softmax cross-entropy, backward, average the
// gradients through the communicator, SGD update, copy the loss and correct count back (the one
// host synchronization of a step).
//
// CUDA graphs. With CudaEngineOptions::graphs on, the first step of each batch size runs eagerly
// (it also warms up the kernels), the second is captured into two graphs — [copy in, forward,
// loss, backward] and [SGD, copy out] — and later steps of that size launch them. The learning
// rate reaches the SGD kernels through device memory, so one graph serves every step.
//
// Gradient averaging: with a communicator that takes device buffers (NCCL) each bucket is averaged
// in place on the device; otherwise each bucket is copied to pinned host memory, averaged by the
// communicator (MPI, parameter server, or a one-process codec) and copied back. Buckets are
// averaged after backward, in the bucket plan's order (no overlap with backward yet).
//
// Guided training (StepEngineInputs::twin): the full-precision twin is compiled the same way, both
// root Sequentials are tapped at the guidance points (GpuSequential), and the front graph runs
// both forwards and losses, the guidance term (Q, the distance and its two gradients in one pass,
// kernels::cuda::DiffScaledSumSquares) and both backwards; the back graph steps both optimizers.
// Gradients of both networks are averaged, each network's buckets under its own keys.
//
// Agreement with the CPU engine: the same initial weights and data order; kernels differ in
// summation order and FMA use, so losses agree to floating-point noise, not bit for bit.
//
// Thread-safety: one thread (the trainer's).
#ifndef QTRAIN_WORKER_NN_CUDA_CUDA_ENGINE_H_
#define QTRAIN_WORKER_NN_CUDA_CUDA_ENGINE_H_

#include "worker/train/step_engine.h"

namespace qtrain::nn::cuda {

struct CudaEngineOptions {
  // CUDA device index; -1 = LOCAL_RANK from the environment (as torchrun and
  // deploy/launch-local.sh set it, or Open MPI's OMPI_COMM_WORLD_LOCAL_RANK), else 0.
  int device = -1;
  bool graphs = true;
};

// FAILED_PRECONDITION when there is no CUDA device; UNIMPLEMENTED naming the first layer the GPU
// cannot run.
train::StepEngineFactory CudaEngineFactory(const CudaEngineOptions& options);

}  // namespace qtrain::nn::cuda

#endif  // QTRAIN_WORKER_NN_CUDA_CUDA_ENGINE_H_
