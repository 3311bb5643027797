#include "worker/data/data_spec.h"

#include <set>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"
#include "worker/data/idx_dataset.h"

namespace qtrain::data {
namespace {

constexpr absl::string_view kFashionMnistName = "fashion-mnist";
constexpr absl::string_view kIdxName = "idx";
constexpr absl::string_view kCifar10Name = "cifar10";
constexpr absl::string_view kSyntheticName = "synthetic";
constexpr absl::string_view kSyntheticKeys = "n, test, classes, shape, seed, noise";

absl::Status BadForm(absl::string_view spec, absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat("bad data spec '", spec, "': ", why, "; valid forms: ", kDataSpecForms));
}

absl::Status BadValue(absl::string_view key, absl::string_view value, absl::string_view expected) {
  return absl::InvalidArgumentError(
      absl::StrCat("bad synthetic data spec value ", key, "=", value, ": expected ", expected));
}

template <typename Int>
absl::Status ParseInt(absl::string_view key, absl::string_view value, Int& out) {
  if (!absl::SimpleAtoi(value, &out)) return BadValue(key, value, "an integer");
  return absl::OkStatus();
}

absl::Status ParseShape(absl::string_view value, SyntheticOptions& o) {
  const std::vector<absl::string_view> parts = absl::StrSplit(value, 'x');
  if (parts.size() != 3 || !absl::SimpleAtoi(parts[0], &o.channels) ||
      !absl::SimpleAtoi(parts[1], &o.height) || !absl::SimpleAtoi(parts[2], &o.width)) {
    return BadValue("shape", value, "<C>x<H>x<W> with integers, e.g. 3x32x32");
  }
  return absl::OkStatus();
}

absl::StatusOr<SyntheticOptions> ParseSynthetic(absl::string_view args) {
  SyntheticOptions o;
  std::set<absl::string_view> seen;
  for (absl::string_view item : absl::StrSplit(args, ',')) {
    const size_t eq = item.find('=');
    if (eq == absl::string_view::npos || eq == 0) {
      return absl::InvalidArgumentError(absl::StrCat("bad synthetic data spec item '", item,
                                                     "': expected <key>=<value> with key one of ",
                                                     kSyntheticKeys));
    }
    const absl::string_view key = item.substr(0, eq);
    const absl::string_view value = item.substr(eq + 1);
    if (!seen.insert(key).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("synthetic data spec key '", key, "' given twice"));
    }
    if (key == "n") {
      RETURN_IF_ERROR(ParseInt(key, value, o.train_size));
    } else if (key == "test") {
      RETURN_IF_ERROR(ParseInt(key, value, o.test_size));
    } else if (key == "classes") {
      RETURN_IF_ERROR(ParseInt(key, value, o.num_classes));
    } else if (key == "seed") {
      RETURN_IF_ERROR(ParseInt(key, value, o.seed));
    } else if (key == "shape") {
      RETURN_IF_ERROR(ParseShape(value, o));
    } else if (key == "noise") {
      if (!absl::SimpleAtod(value, &o.noise)) return BadValue(key, value, "a number");
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown synthetic data spec key '", key,
                                                     "'; valid keys: ", kSyntheticKeys));
    }
  }
  RETURN_IF_ERROR(ValidateSyntheticOptions(o));
  return o;
}

}  // namespace

absl::StatusOr<DataSpec> ParseDataSpec(absl::string_view spec) {
  const size_t colon = spec.find(':');
  const absl::string_view name = spec.substr(0, colon);
  const bool has_arg = colon != absl::string_view::npos;
  const absl::string_view arg = has_arg ? spec.substr(colon + 1) : absl::string_view();
  DataSpec result;
  if (name == kFashionMnistName) {
    result.source = DataSource::kFashionMnist;
    if (has_arg && arg.empty()) return BadForm(spec, "empty directory");
    result.dir = has_arg ? std::string(arg) : std::string(kFashionMnistDefaultDir);
    return result;
  }
  if (name == kIdxName || name == kCifar10Name) {
    result.source = name == kIdxName ? DataSource::kIdx : DataSource::kCifar10;
    if (arg.empty())
      return BadForm(spec, absl::StrCat(name, " needs a directory: ", name, ":<dir>"));
    result.dir = std::string(arg);
    return result;
  }
  if (name == kSyntheticName) {
    result.source = DataSource::kSynthetic;
    if (has_arg) {
      if (arg.empty()) return BadForm(spec, "nothing after 'synthetic:'");
      ASSIGN_OR_RETURN(result.synthetic, ParseSynthetic(arg));
    }
    return result;
  }
  return BadForm(spec, absl::StrCat("unknown data set '", name, "'"));
}

std::string DataSpecToString(const DataSpec& spec) {
  switch (spec.source) {
    case DataSource::kFashionMnist:
      return absl::StrCat(kFashionMnistName, ":", spec.dir);
    case DataSource::kIdx:
      return absl::StrCat(kIdxName, ":", spec.dir);
    case DataSource::kCifar10:
      return absl::StrCat(kCifar10Name, ":", spec.dir);
    case DataSource::kSynthetic: {
      const SyntheticOptions& o = spec.synthetic;
      return absl::StrCat(kSyntheticName, ":n=", o.train_size, ",test=", o.test_size,
                          ",classes=", o.num_classes, ",shape=", o.channels, "x", o.height, "x",
                          o.width, ",seed=", o.seed, ",noise=", o.noise);
    }
  }
  return "unknown";
}

}  // namespace qtrain::data
