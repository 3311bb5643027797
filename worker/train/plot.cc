#include "worker/train/plot.h"

#include <zlib.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"

namespace qtrain::train {
namespace {

// The number after "\"key\":" in a JSON object line; false when absent or not a number.
bool FindNumber(absl::string_view line, absl::string_view key, double* out) {
  const std::string needle = absl::StrCat("\"", std::string(key), "\":");
  const size_t at = line.find(needle);
  if (at == absl::string_view::npos) return false;
  absl::string_view rest = line.substr(at + needle.size());
  const size_t end = rest.find_first_of(",}");
  return absl::SimpleAtod(rest.substr(0, end), out);
}

// ---- a 5x7 bitmap font: rows top to bottom, '#' = ink ----------------------------------------

const std::map<char, std::array<const char*, 7>>& Font() {
  static const auto* font = new std::map<char, std::array<const char*, 7>>{
      {'0', {" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "}},
      {'1', {"  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "}},
      {'2', {" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"}},
      {'3', {"#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "}},
      {'4', {"   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "}},
      {'5', {"#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "}},
      {'6', {"  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "}},
      {'7', {"#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "}},
      {'8', {" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "}},
      {'9', {" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "}},
      {'A', {" ### ", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"}},
      {'B', {"#### ", "#   #", "#   #", "#### ", "#   #", "#   #", "#### "}},
      {'C', {" ### ", "#   #", "#    ", "#    ", "#    ", "#   #", " ### "}},
      {'D', {"###  ", "#  # ", "#   #", "#   #", "#   #", "#  # ", "###  "}},
      {'E', {"#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#####"}},
      {'F', {"#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#    "}},
      {'G', {" ### ", "#   #", "#    ", "# ###", "#   #", "#   #", " ####"}},
      {'H', {"#   #", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"}},
      {'I', {" ### ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "}},
      {'J', {"  ###", "   # ", "   # ", "   # ", "   # ", "#  # ", " ##  "}},
      {'K', {"#   #", "#  # ", "# #  ", "##   ", "# #  ", "#  # ", "#   #"}},
      {'L', {"#    ", "#    ", "#    ", "#    ", "#    ", "#    ", "#####"}},
      {'M', {"#   #", "## ##", "# # #", "# # #", "#   #", "#   #", "#   #"}},
      {'N', {"#   #", "#   #", "##  #", "# # #", "#  ##", "#   #", "#   #"}},
      {'O', {" ### ", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "}},
      {'P', {"#### ", "#   #", "#   #", "#### ", "#    ", "#    ", "#    "}},
      {'Q', {" ### ", "#   #", "#   #", "#   #", "# # #", "#  # ", " ## #"}},
      {'R', {"#### ", "#   #", "#   #", "#### ", "# #  ", "#  # ", "#   #"}},
      {'S', {" ####", "#    ", "#    ", " ### ", "    #", "    #", "#### "}},
      {'T', {"#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "}},
      {'U', {"#   #", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "}},
      {'V', {"#   #", "#   #", "#   #", "#   #", "#   #", " # # ", "  #  "}},
      {'W', {"#   #", "#   #", "#   #", "# # #", "# # #", "# # #", " # # "}},
      {'X', {"#   #", "#   #", " # # ", "  #  ", " # # ", "#   #", "#   #"}},
      {'Y', {"#   #", "#   #", " # # ", "  #  ", "  #  ", "  #  ", "  #  "}},
      {'Z', {"#####", "    #", "   # ", "  #  ", " #   ", "#    ", "#####"}},
      {'.', {"     ", "     ", "     ", "     ", "     ", " ##  ", " ##  "}},
      {',', {"     ", "     ", "     ", "     ", " ##  ", "  #  ", " #   "}},
      {':', {"     ", " ##  ", " ##  ", "     ", " ##  ", " ##  ", "     "}},
      {'%', {"##   ", "##  #", "   # ", "  #  ", " #   ", "#  ##", "   ##"}},
      {'+', {"     ", "  #  ", "  #  ", "#####", "  #  ", "  #  ", "     "}},
      {'-', {"     ", "     ", "     ", "#####", "     ", "     ", "     "}},
      {'=', {"     ", "     ", "#####", "     ", "#####", "     ", "     "}},
      {'*', {"     ", "  #  ", "# # #", " ### ", "# # #", "  #  ", "     "}},
      {'/', {"     ", "    #", "   # ", "  #  ", " #   ", "#    ", "     "}},
      {'(', {"   # ", "  #  ", " #   ", " #   ", " #   ", "  #  ", "   # "}},
      {')', {" #   ", "  #  ", "   # ", "   # ", "   # ", "  #  ", " #   "}},
      {'_', {"     ", "     ", "     ", "     ", "     ", "     ", "#####"}},
      {'|', {"  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "}},
      {'>', {" #   ", "  #  ", "   # ", "    #", "   # ", "  #  ", " #   "}},
      {'<', {"   # ", "  #  ", " #   ", "#    ", " #   ", "  #  ", "   # "}},
  };
  return *font;
}

struct Rgb {
  uint8_t r, g, b;
};

constexpr Rgb kWhite{255, 255, 255}, kBlack{0, 0, 0}, kGrid{225, 225, 225}, kMark{150, 150, 150};
// Distinguishable line colours (Tableau 10).
constexpr Rgb kPalette[] = {{31, 119, 180}, {214, 39, 40},  {44, 160, 44},  {148, 103, 189},
                            {255, 127, 14}, {140, 86, 75},  {227, 119, 194}, {127, 127, 127},
                            {188, 189, 34}, {23, 190, 207}};

class Canvas {
 public:
  Canvas(int w, int h) : w_(w), h_(h), rgb_(static_cast<size_t>(w) * h * 3, 255) {}
  void Set(int x, int y, Rgb c) {
    if (x < 0 || y < 0 || x >= w_ || y >= h_) return;
    uint8_t* p = &rgb_[(static_cast<size_t>(y) * w_ + x) * 3];
    p[0] = c.r;
    p[1] = c.g;
    p[2] = c.b;
  }
  void Fill(int x0, int y0, int x1, int y1, Rgb c) {
    for (int y = y0; y <= y1; ++y) {
      for (int x = x0; x <= x1; ++x) Set(x, y, c);
    }
  }
  // A line `thick` pixels wide; dashed when dash > 0 (on dash, off dash pixels).
  void Line(double x0, double y0, double x1, double y1, Rgb c, int thick, int dash = 0) {
    const double len = std::max(std::abs(x1 - x0), std::abs(y1 - y0));
    const int steps = std::max(1, static_cast<int>(std::ceil(len)));
    for (int i = 0; i <= steps; ++i) {
      if (dash > 0 && (i / dash) % 2 == 1) continue;
      const double t = static_cast<double>(i) / steps;
      const int x = static_cast<int>(std::lround(x0 + t * (x1 - x0)));
      const int y = static_cast<int>(std::lround(y0 + t * (y1 - y0)));
      const int lo = -(thick - 1) / 2, hi = thick / 2;
      Fill(x + lo, y + lo, x + hi, y + hi, c);
    }
  }
  // Text at scale `s` (glyph 5x7 -> 5s x 7s, advance 6s), top-left at (x, y). Lower case is
  // drawn as upper case; unknown characters as blanks.
  void Text(int x, int y, absl::string_view text, Rgb c, int s) {
    for (char ch : text) {
      const char up = (ch >= 'a' && ch <= 'z') ? static_cast<char>(ch - 'a' + 'A') : ch;
      auto it = Font().find(up);
      if (it != Font().end()) {
        for (int r = 0; r < 7; ++r) {
          for (int k = 0; k < 5; ++k) {
            if (it->second[static_cast<size_t>(r)][k] == '#') {
              Fill(x + k * s, y + r * s, x + k * s + s - 1, y + r * s + s - 1, c);
            }
          }
        }
      }
      x += 6 * s;
    }
  }
  static int TextWidth(absl::string_view text, int s) {
    return static_cast<int>(text.size()) * 6 * s - s;
  }
  const std::vector<uint8_t>& rgb() const { return rgb_; }

 private:
  int w_, h_;
  std::vector<uint8_t> rgb_;
};

void AppendBigEndian(std::string* out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out->push_back(static_cast<char>((v >> shift) & 0xff));
}

void AppendChunk(std::string* out, const char type[4], const std::string& data) {
  AppendBigEndian(out, static_cast<uint32_t>(data.size()));
  std::string body(type, 4);
  body += data;
  out->append(body);
  AppendBigEndian(out, static_cast<uint32_t>(crc32(0L, reinterpret_cast<const Bytef*>(body.data()),
                                                   static_cast<uInt>(body.size()))));
}

// A "nice" tick step for a range (1, 2 or 5 times a power of ten) giving about `target` ticks.
double TickStep(double range, int target) {
  const double raw = range / std::max(1, target);
  const double p = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0, 10.0}) {
    if (m * p >= raw) return m * p;
  }
  return 10 * p;
}

std::string TickLabel(double v, double step) {
  return step >= 1 ? absl::StrFormat("%.0f", v) : absl::StrFormat("%.1f", v);
}

}  // namespace

absl::StatusOr<Curve> ParseCurve(absl::string_view metrics_text, absl::string_view source) {
  Curve curve;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(metrics_text, '\n')) {
    ++line_no;
    if (line.find("\"type\":\"epoch\"") == absl::string_view::npos) continue;
    double epoch = 0, acc = 0;
    if (!FindNumber(line, "epoch", &epoch) || !FindNumber(line, "test_accuracy", &acc) ||
        !std::isfinite(acc)) {
      return absl::InvalidArgumentError(absl::StrCat(
          std::string(source), ":", line_no,
          ": an epoch record without a numeric \"epoch\" and \"test_accuracy\""));
    }
    if (epoch != static_cast<double>(curve.size())) {
      return absl::InvalidArgumentError(absl::StrCat(std::string(source), ":", line_no, ": epoch ",
                                                     epoch, " where epoch ", curve.size(),
                                                     " was expected (a resumed or mixed file?)"));
    }
    curve.push_back(100.0 * acc);
  }
  if (curve.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(std::string(source), ": no epoch records (is it a --metrics file?)"));
  }
  return curve;
}

absl::StatusOr<MeanCurve> AverageCurves(const std::vector<Curve>& runs) {
  if (runs.empty()) return absl::InvalidArgumentError("no runs to average");
  MeanCurve out;
  out.runs = static_cast<int>(runs.size());
  const size_t n = runs[0].size();
  for (const Curve& c : runs) {
    if (c.size() != n) {
      return absl::InvalidArgumentError(absl::StrCat("runs of different lengths (", n, " and ",
                                                     c.size(), " epochs) cannot be averaged"));
    }
  }
  out.mean.assign(n, 0.0);
  out.stddev.assign(n, 0.0);
  for (size_t i = 0; i < n; ++i) {
    double sum = 0;
    for (const Curve& c : runs) sum += c[i];
    const double mean = sum / static_cast<double>(runs.size());
    double sq = 0;
    for (const Curve& c : runs) sq += (c[i] - mean) * (c[i] - mean);
    out.mean[i] = mean;
    out.stddev[i] = runs.size() > 1 ? std::sqrt(sq / static_cast<double>(runs.size() - 1)) : 0.0;
  }
  return out;
}

std::string EncodePng(int width, int height, const std::vector<uint8_t>& rgb) {
  std::string raw;
  raw.reserve(static_cast<size_t>(height) * (1 + 3 * static_cast<size_t>(width)));
  for (int y = 0; y < height; ++y) {
    raw.push_back('\0');  // filter: none
    raw.append(reinterpret_cast<const char*>(&rgb[static_cast<size_t>(y) * width * 3]),
               static_cast<size_t>(width) * 3);
  }
  uLongf packed_size = compressBound(static_cast<uLong>(raw.size()));
  std::string packed(packed_size, '\0');
  compress2(reinterpret_cast<Bytef*>(packed.data()), &packed_size,
            reinterpret_cast<const Bytef*>(raw.data()), static_cast<uLong>(raw.size()), 9);
  packed.resize(packed_size);
  std::string png("\x89PNG\r\n\x1a\n", 8);
  std::string ihdr;
  AppendBigEndian(&ihdr, static_cast<uint32_t>(width));
  AppendBigEndian(&ihdr, static_cast<uint32_t>(height));
  ihdr += std::string("\x08\x02\x00\x00\x00", 5);  // 8 bits, RGB, deflate, filter 0, no interlace
  AppendChunk(&png, "IHDR", ihdr);
  AppendChunk(&png, "IDAT", packed);
  AppendChunk(&png, "IEND", "");
  return png;
}

absl::StatusOr<std::string> RenderPlot(const std::vector<Series>& series,
                                       const PlotOptions& options) {
  if (series.empty()) return absl::InvalidArgumentError("nothing to plot: no series");
  if (options.width < 200 || options.height < 150) {
    return absl::InvalidArgumentError("the plot must be at least 200x150 pixels");
  }
  size_t epochs = 0;
  double lo = 1e9, hi = -1e9;
  for (const Series& s : series) {
    if (s.curve.mean.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("series '", s.label, "' is empty"));
    }
    epochs = std::max(epochs, s.curve.mean.size());
    for (double v : s.curve.mean) {
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
  }
  lo = options.y_min >= 0 ? options.y_min : std::floor(lo);
  hi = options.y_max >= 0 ? options.y_max : std::ceil(hi);
  if (hi <= lo) hi = lo + 1;

  const int s = 2;  // font scale
  const int w = options.width, h = options.height;
  const int left = 70, right = w - 20, top = 68, bottom = h - 60;
  Canvas c(w, h);
  auto px = [&](double epoch) {
    return left + (epoch - 1) / std::max<double>(1, static_cast<double>(epochs) - 1) * (right - left);
  };
  auto py = [&](double v) { return bottom - (v - lo) / (hi - lo) * (bottom - top); };

  // Grid and tick labels.
  const double ystep = TickStep(hi - lo, 6);
  for (double v = std::ceil(lo / ystep) * ystep; v <= hi + 1e-9; v += ystep) {
    const int y = static_cast<int>(std::lround(py(v)));
    c.Line(left, y, right, y, kGrid, 1);
    const std::string label = TickLabel(v, ystep);
    c.Text(left - 8 - Canvas::TextWidth(label, s), y - 7, label, kBlack, s);
  }
  const double xstep = std::max(1.0, TickStep(static_cast<double>(epochs) - 1, 8));
  for (double e = 1; e <= static_cast<double>(epochs) + 1e-9; e += xstep) {
    const int x = static_cast<int>(std::lround(px(e)));
    c.Line(x, top, x, bottom, kGrid, 1);
    const std::string label = absl::StrFormat("%.0f", e);
    c.Text(x - Canvas::TextWidth(label, s) / 2, bottom + 8, label, kBlack, s);
  }
  c.Line(left, top, left, bottom, kBlack, 2);
  c.Line(left, bottom, right, bottom, kBlack, 2);
  const std::string xlabel = "epoch";
  c.Text((left + right - Canvas::TextWidth(xlabel, s)) / 2, bottom + 32, xlabel, kBlack, s);
  c.Text(8, top - 24, "test accuracy %", kBlack, s);
  c.Text((w - Canvas::TextWidth(options.title, s)) / 2, 10, options.title, kBlack, s);

  for (size_t m = 0; m < options.marks.size(); ++m) {
    const double x = px(options.marks[m]);
    c.Line(x, top, x, bottom, kMark, 2, 6);
    if (m == 0 && !options.mark_label.empty()) {
      c.Text(static_cast<int>(x) + 6, top + 6, options.mark_label, kMark, s);
    }
  }
  // Curves: mean lines with a point per epoch.
  for (size_t k = 0; k < series.size(); ++k) {
    const Rgb color = kPalette[k % std::size(kPalette)];
    const Curve& mean = series[k].curve.mean;
    for (size_t i = 0; i < mean.size(); ++i) {
      const double x = px(static_cast<double>(i + 1)), y = py(std::clamp(mean[i], lo, hi));
      c.Fill(static_cast<int>(x) - 2, static_cast<int>(y) - 2, static_cast<int>(x) + 2,
             static_cast<int>(y) + 2, color);
      if (i + 1 < mean.size()) {
        c.Line(x, y, px(static_cast<double>(i + 2)), py(std::clamp(mean[i + 1], lo, hi)), color,
               3);
      }
    }
  }
  // Legend, bottom right inside the axes.
  int widest = 0;
  for (const Series& se : series) widest = std::max(widest, Canvas::TextWidth(se.label, s));
  const int row = 22;
  const int lx = right - widest - 60, ly = bottom - 12 - row * static_cast<int>(series.size());
  c.Fill(lx - 8, ly - 8, right - 8, bottom - 8, kWhite);
  for (size_t k = 0; k < series.size(); ++k) {
    const int y = ly + row * static_cast<int>(k);
    c.Line(lx, y + 7, lx + 36, y + 7, kPalette[k % std::size(kPalette)], 3);
    c.Text(lx + 44, y, series[k].label, kBlack, s);
  }
  return EncodePng(w, h, c.rgb());
}

}  // namespace qtrain::train
