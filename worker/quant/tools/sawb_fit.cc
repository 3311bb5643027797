// sawb_fit: derives the SAWB coefficients (c1, c2) of sawb_table.h as the PACT-SAWB paper does.
//
// For each bit-width 1..8 and each of the six distributions the paper names (Gaussian, uniform,
// Laplace, logistic, triangular, von Mises), at three scales each, it draws a seeded sample,
// finds the MSE-optimal scale alpha* of the symmetric uniform quantizer by exhaustive search
// (SymmetricUniformMse::Optimal), and fits alpha* = c1 * sqrt(E[w^2]) - c2 * E[|w|] by least
// squares. Each point is divided by its sqrt(E[w^2]) before fitting (alpha*/rms = c1 - c2 *
// E|w|/rms), so the fit measures relative error and does not weight large scales more. Prints
// the table in the C++ form sawb_table.h holds, plus the worst relative error of the fitted
// alpha and of the resulting MSE. Deterministic: fixed seeds, no threads.
//
//   sawb_fit [--samples=N] [--verbose]   (default 200000; the table was produced with the
//   default; --verbose prints every point to stderr)
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numbers>
#include <random>
#include <string>
#include <vector>

#include "worker/quant/sawb.h"

namespace qtrain::quant {
namespace {

struct Distribution {
  const char* name;
  std::function<double(std::mt19937_64&)> draw;  // unit-scale sample
};

// Best & Fisher (1979) rejection sampler for the von Mises distribution, mean 0.
double VonMises(std::mt19937_64& rng, double kappa) {
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  const double tau = 1.0 + std::sqrt(1.0 + 4.0 * kappa * kappa);
  const double rho = (tau - std::sqrt(2.0 * tau)) / (2.0 * kappa);
  const double r = (1.0 + rho * rho) / (2.0 * rho);
  while (true) {
    const double u1 = u01(rng), u2 = u01(rng), u3 = u01(rng);
    const double z = std::cos(std::numbers::pi * u1);
    const double f = (1.0 + r * z) / (r + z);
    const double c = kappa * (r - f);
    if (c * (2.0 - c) - u2 > 0.0 || std::log(c / u2) + 1.0 - c >= 0.0) {
      return (u3 > 0.5 ? 1.0 : -1.0) * std::acos(f);
    }
  }
}

std::vector<Distribution> Distributions() {
  return {
      {"gaussian", [](std::mt19937_64& g) { return std::normal_distribution<double>(0, 1)(g); }},
      {"uniform",
       [](std::mt19937_64& g) { return std::uniform_real_distribution<double>(-1, 1)(g); }},
      {"laplace",
       [](std::mt19937_64& g) {
         const double u = std::uniform_real_distribution<double>(-0.5, 0.5)(g);
         return (u < 0 ? 1.0 : -1.0) * std::log(1.0 - 2.0 * std::fabs(u));
       }},
      {"logistic",
       [](std::mt19937_64& g) {
         const double u = std::uniform_real_distribution<double>(1e-12, 1.0 - 1e-12)(g);
         return std::log(u / (1.0 - u));
       }},
      {"triangular",
       [](std::mt19937_64& g) {
         std::uniform_real_distribution<double> u(-0.5, 0.5);
         return u(g) + u(g);
       }},
      {"von_mises", [](std::mt19937_64& g) { return VonMises(g, 2.0); }},
  };
}

// Rounds to the 4 printed decimals and drops the sign of zero, so "-0.0000" never appears.
double Clean(double v) {
  const double r = std::round(v * 1e4) / 1e4;
  return r == 0.0 ? 0.0 : r;
}

int Main(int argc, char** argv) {
  int samples = 200000;
  bool verbose = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--samples=", 10) == 0) {
      samples = std::atoi(argv[i] + 10);
    } else if (std::strcmp(argv[i], "--verbose") == 0) {
      verbose = true;
    } else {
      std::fprintf(stderr, "usage: sawb_fit [--samples=N] [--verbose]\n");
      return 2;
    }
  }
  if (samples < 1000) {
    std::fprintf(stderr, "--samples must be >= 1000\n");
    return 2;
  }
  const std::vector<Distribution> dists = Distributions();
  const double scales[] = {0.01, 0.1, 1.0};
  // Samples are drawn once per (distribution, scale) and reused for every bit-width.
  struct Point {
    const char* dist;
    SymmetricUniformMse mse;
  };
  std::vector<Point> points;
  for (size_t d = 0; d < dists.size(); ++d) {
    for (size_t s = 0; s < std::size(scales); ++s) {
      std::mt19937_64 rng(1000 + 10 * d + s);
      std::vector<float> w(static_cast<size_t>(samples));
      for (float& v : w) v = static_cast<float>(scales[s] * dists[d].draw(rng));
      points.push_back({dists[d].name, SymmetricUniformMse(w)});
    }
  }
  std::printf("// Produced by: sawb_fit --samples=%d\n", samples);
  std::printf(
      "// bits: c1, c2   (worst |alpha_fit/alpha*-1|, worst MSE(alpha_fit)/MSE(alpha*)-1)\n");
  std::printf("inline constexpr SawbCoefficients kSawbCoefficients[8] = {\n");
  for (int bits = 1; bits <= 8; ++bits) {
    // Least squares on y = alpha*/rms against x = E|w|/rms: y = c1 - c2 x.
    std::vector<double> xs, ys, opt_mse;
    for (const Point& p : points) {
      const SymmetricUniformMse::Optimum o = p.mse.Optimal(bits);
      xs.push_back(p.mse.mean_abs() / p.mse.rms());
      ys.push_back(o.alpha / p.mse.rms());
      opt_mse.push_back(o.mse);
    }
    const double m = static_cast<double>(xs.size());
    double sx = 0, sy = 0, sxx = 0, sxy = 0;
    for (size_t i = 0; i < xs.size(); ++i) {
      sx += xs[i];
      sy += ys[i];
      sxx += xs[i] * xs[i];
      sxy += xs[i] * ys[i];
    }
    const double slope = (m * sxy - sx * sy) / (m * sxx - sx * sx);
    const double c1 = (sy - slope * sx) / m;
    const double c2 = -slope;
    double worst_alpha = 0.0, worst_mse = 0.0;
    for (size_t i = 0; i < points.size(); ++i) {
      const double fit = c1 - c2 * xs[i];
      worst_alpha = std::max(worst_alpha, std::fabs(fit / ys[i] - 1.0));
      const double e = points[i].mse.Mse(bits, fit * points[i].mse.rms());
      worst_mse = std::max(worst_mse, e / opt_mse[i] - 1.0);
      if (verbose) {
        std::fprintf(stderr, "bits %d %-10s rms %.4g alpha*/rms %.4f fit/rms %.4f mse ratio %.4f\n",
                     bits, points[i].dist, points[i].mse.rms(), ys[i], fit, e / opt_mse[i]);
      }
    }
    std::printf("    {%.4f, %.4f},  // %d bit%s (%.3f, %.3f)\n", Clean(c1), Clean(c2), bits,
                bits == 1 ? "" : "s", worst_alpha, worst_mse);
  }
  std::printf("};\n");
  return 0;
}

}  // namespace
}  // namespace qtrain::quant

int main(int argc, char** argv) { return qtrain::quant::Main(argc, argv); }
