// Portable, seeded random helpers for the data pipeline.
//
// std::uniform_int_distribution, std::normal_distribution and std::shuffle are
// implementation-defined, so the same seed could give different permutations or images under
// libstdc++ and libc++. Everything in qtrain::data draws from std::mt19937_64 (whose output
// the standard fixes) through these helpers, so a seed means the same data on every machine.
//
// Thread-safety: free functions; each call mutates only the engine it is given.
// Cost: a few engine draws per call.
#ifndef QTRAIN_WORKER_DATA_RNG_H_
#define QTRAIN_WORKER_DATA_RNG_H_

#include <cstdint>
#include <random>

namespace qtrain::data {

// One SplitMix64 step: a bijective 64-bit mixer. Used to derive independent seeds.
uint64_t SplitMix64(uint64_t x);

// A seed for an independent stream: DeriveSeed(seed, epoch) differs in (practically) every bit
// from DeriveSeed(seed, epoch + 1). Stream ids can be chained: DeriveSeed(DeriveSeed(s, a), b).
uint64_t DeriveSeed(uint64_t seed, uint64_t stream);

// Uniform integer in [0, n), unbiased (Lemire's multiply-and-reject). Precondition: n > 0.
uint64_t UniformBelow(std::mt19937_64& rng, uint64_t n);

// Uniform double in [0, 1) with 53 random bits.
double UniformUnit(std::mt19937_64& rng);

// Standard normal deviate (Box-Muller; uses two uniforms per call).
double StandardNormal(std::mt19937_64& rng);

}  // namespace qtrain::data

#endif  // QTRAIN_WORKER_DATA_RNG_H_
