// Weight initialisation from an explicit, seeded random engine.
//
// The normal samples come from our own Box-Muller transform over std::mt19937_64 bits (whose
// output sequence the C++ standard fixes), not std::normal_distribution (whose algorithm is up to
// the standard library), so the same seed gives the same weights with any compiler.
//
// Thread-safety: the engine is mutated; one thread at a time. Cost: one engine draw per sample.
#ifndef QTRAIN_WORKER_NN_INIT_H_
#define QTRAIN_WORKER_NN_INIT_H_

#include <cstdint>
#include <random>

#include "worker/nn/tensor.h"

namespace qtrain::nn {

// One N(0, 1) sample.
double StandardNormal(std::mt19937_64& rng);

// Kaiming-normal (He et al. 2015, "Delving Deep into Rectifiers"), fan-in mode with the ReLU
// gain: every element of `t` ~ N(0, 2 / fan_in). Precondition: fan_in >= 1.
void KaimingNormal(int64_t fan_in, std::mt19937_64& rng, Tensor* t);

// PyTorch's default for linear layers (kaiming_uniform with a = sqrt(5), and the bias rule):
// every element ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Used for fully connected layers, where
// the ReLU-gain Kaiming init makes the classifier's initial logits (and first gradients) large.
void UniformFanIn(int64_t fan_in, std::mt19937_64& rng, Tensor* t);

}  // namespace qtrain::nn

#endif  // QTRAIN_WORKER_NN_INIT_H_
