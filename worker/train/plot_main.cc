// qtrain_plot: test accuracy per epoch from `qtrain --metrics` files, as a PNG (train/plot.h).
//
//   qtrain_plot --out=fig.png --title="cnn 2/2" --marks=8 --mark_label="stage 2"
//       "Baseline=a-s1.jsonl,a-s2.jsonl,a-s3.jsonl" "Stage 2+Guided=b-s1.jsonl,..."
//
// Each positional argument is LABEL=FILE[,FILE...]; a series with several files (seeds) is drawn
// as their mean per epoch.
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"
#include "worker/train/plot.h"

ABSL_FLAG(std::string, out, "", "The PNG to write (required).");
ABSL_FLAG(std::string, title, "", "The title above the plot.");
ABSL_FLAG(std::string, marks, "", "Epochs at which to draw dashed vertical lines, e.g. 7.5,10.5.");
ABSL_FLAG(std::string, mark_label, "", "Text beside the first mark.");
ABSL_FLAG(double, y_min, -1, "Lower end of the accuracy axis in % (default: from the data).");
ABSL_FLAG(double, y_max, -1, "Upper end of the accuracy axis in % (default: from the data).");
ABSL_FLAG(int, width, 900, "Width in pixels.");
ABSL_FLAG(int, height, 560, "Height in pixels.");

namespace qtrain::train {
namespace {

absl::StatusOr<std::string> ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open metrics file '", path, "'"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::Status Run(const std::vector<char*>& args) {
  const std::string out = absl::GetFlag(FLAGS_out);
  if (out.empty()) return absl::InvalidArgumentError("--out=<file.png> is required");
  if (args.size() < 2) {
    return absl::InvalidArgumentError("give at least one series LABEL=FILE[,FILE...]");
  }
  PlotOptions options;
  options.title = absl::GetFlag(FLAGS_title);
  options.mark_label = absl::GetFlag(FLAGS_mark_label);
  options.y_min = absl::GetFlag(FLAGS_y_min);
  options.y_max = absl::GetFlag(FLAGS_y_max);
  options.width = absl::GetFlag(FLAGS_width);
  options.height = absl::GetFlag(FLAGS_height);
  for (absl::string_view m : absl::StrSplit(absl::GetFlag(FLAGS_marks), ',', absl::SkipEmpty())) {
    double v = 0;
    if (!absl::SimpleAtod(m, &v)) {
      return absl::InvalidArgumentError(absl::StrCat("--marks: '", m, "' is not a number"));
    }
    options.marks.push_back(v);
  }
  std::vector<Series> series;
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string arg = args[i];
    const size_t eq = arg.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == arg.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("series '", arg, "' is not LABEL=FILE[,FILE...]"));
    }
    std::vector<Curve> runs;
    for (absl::string_view file : absl::StrSplit(arg.substr(eq + 1), ',', absl::SkipEmpty())) {
      ASSIGN_OR_RETURN(std::string text, ReadAll(std::string(file)));
      ASSIGN_OR_RETURN(Curve c, ParseCurve(text, file));
      runs.push_back(std::move(c));
    }
    Series s;
    s.label = arg.substr(0, eq);
    ASSIGN_OR_RETURN(s.curve, AverageCurves(runs));
    series.push_back(std::move(s));
  }
  ASSIGN_OR_RETURN(std::string png, RenderPlot(series, options));
  const std::string tmp = out + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f.write(png.data(), static_cast<std::streamsize>(png.size()));
    if (!f) return absl::InternalError(absl::StrCat("cannot write '", tmp, "'"));
  }
  if (std::rename(tmp.c_str(), out.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("cannot rename '", tmp, "' to '", out, "'"));
  }
  std::printf("wrote %s (%zu series, %zu bytes)\n", out.c_str(), series.size(), png.size());
  return absl::OkStatus();
}

}  // namespace
}  // namespace qtrain::train

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "qtrain_plot --out=fig.png [--title=T] [--marks=E,...] LABEL=metrics.jsonl[,more seeds] ...\n"
      "Draws the test accuracy per epoch of qtrain --metrics files (mean over the files of a "
      "series).");
  const std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  const absl::Status s = qtrain::train::Run(args);
  if (!s.ok()) {
    std::fprintf(stderr, "qtrain_plot: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
