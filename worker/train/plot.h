// Accuracy-per-epoch plots for the README (qtrain_plot): curves read from `--metrics` files
// (metrics.h's epoch records) and drawn into a PNG with the project's own rasteriser — axes, grid,
// tick labels, a legend, optional vertical marks (e.g. a two-stage boundary) — written with zlib.
// No plotting library: the figure needs lines and a 5x7 bitmap font, nothing more.
//
// Thread-safety: pure functions. Cost: a few milliseconds for a 900x560 figure.
#ifndef QTRAIN_WORKER_TRAIN_PLOT_H_
#define QTRAIN_WORKER_TRAIN_PLOT_H_

#include <cstdint>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/statusor.h"

namespace qtrain::train {

// Test accuracy (in %) after each epoch, in epoch order: element i is epoch i + 1.
using Curve = std::vector<double>;

// The epoch records of a metrics file's text. INVALID_ARGUMENT naming `source` and the line for an
// epoch record without a numeric "epoch" or "test_accuracy", for epochs out of order, or when the
// text holds no epoch record.
absl::StatusOr<Curve> ParseCurve(absl::string_view metrics_text, absl::string_view source);

// Mean and (sample) standard deviation per epoch over runs of one setting (seeds); the runs must
// have the same length (INVALID_ARGUMENT otherwise).
struct MeanCurve {
  Curve mean, stddev;
  int runs = 0;
};
absl::StatusOr<MeanCurve> AverageCurves(const std::vector<Curve>& runs);

struct Series {
  std::string label;
  MeanCurve curve;
};

struct PlotOptions {
  std::string title;
  int width = 900, height = 560;
  double y_min = -1, y_max = -1;  // < 0: from the data, rounded out to whole percents
  std::vector<double> marks;      // epochs at which to draw a dashed vertical line
  std::string mark_label;         // printed beside the first mark
};

// An RGB image encoded as PNG (8-bit, no interlace). INVALID_ARGUMENT for no series, an empty
// curve or a size below 200x150.
absl::StatusOr<std::string> RenderPlot(const std::vector<Series>& series,
                                       const PlotOptions& options);

// The PNG container around raw RGB rows (filter 0): for RenderPlot and tests.
std::string EncodePng(int width, int height, const std::vector<uint8_t>& rgb);

}  // namespace qtrain::train

#endif  // QTRAIN_WORKER_TRAIN_PLOT_H_
