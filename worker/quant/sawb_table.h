// Fitted SAWB coefficients: alpha* = c1 * sqrt(E[w^2]) - c2 * E[|w|], indexed by bits - 1.
//
// Produced by `build/bin/sawb_fit` (worker/quant/tools/sawb_fit.cc, default --samples=200000):
// least squares of the MSE-optimal scale of the 2^k-level symmetric uniform quantizer over
// Gaussian, uniform, Laplace, logistic, triangular and von Mises (kappa 2) samples at scales
// 0.01, 0.1 and 1, fitted relative to sqrt(E[w^2]). The comment on each row gives the worst
// relative error of the fitted alpha over those 18 samples and the worst excess MSE
// MSE(alpha_fit) / MSE(alpha*) - 1. The paper's 2-bit row is (3.2, 2.1).
// 1 bit is exact: the optimal scale of {-alpha, +alpha} is E|w| (c1 = 0, c2 = -1).
// Above 4 bits one linear rule cannot serve bounded and heavy-tailed distributions at once. The
// worst case is always the uniform distribution, whose optimum is its edge: the fitted alpha
// clips it, and at 6-8 bits the clipping error dwarfs the tiny rounding error (MSE 5x at 6 bits,
// 670x at 8); Gaussian and Laplace stay within 18% at every width (sawb_fit --verbose). Prefer a
// searched or learned scale for near-uniform weights at high bit-widths.
#ifndef QTRAIN_WORKER_QUANT_SAWB_TABLE_H_
#define QTRAIN_WORKER_QUANT_SAWB_TABLE_H_

namespace qtrain::quant {

struct SawbCoefficients {
  double c1;
  double c2;
};

// The rows below are sawb_fit output verbatim (tail -n +2 of its stdout).
// clang-format off
// bits: c1, c2   (worst |alpha_fit/alpha*-1|, worst MSE(alpha_fit)/MSE(alpha*)-1)
inline constexpr SawbCoefficients kSawbCoefficients[8] = {
    {0.0000, -1.0000},  // 1 bit (0.000, 0.000)
    {3.2340, 2.2001},  // 2 bits (0.031, 0.005)
    {7.5844, 6.9779},  // 3 bits (0.042, 0.015)
    {12.1971, 12.2185},  // 4 bits (0.084, 0.085)
    {16.9302, 17.7047},  // 5 bits (0.127, 0.345)
    {21.3401, 22.8558},  // 6 bits (0.167, 5.114)
    {26.0299, 28.3861},  // 7 bits (0.236, 76.669)
    {30.4982, 33.6437},  // 8 bits (0.343, 670.569)
};
// clang-format on

}  // namespace qtrain::quant

#endif  // QTRAIN_WORKER_QUANT_SAWB_TABLE_H_
