// The --data flag's value: which data set to load. main.cc parses flags; this parses the string.
//
// Valid forms:
//   fashion-mnist            Fashion-MNIST IDX files from /usr/share/datasets/fashion-mnist
//   fashion-mnist:<dir>      the same from <dir>
//   idx:<dir>                any IDX data set laid out as MNIST (idx_dataset.h)
//   cifar10:<dir>            CIFAR-10 binary batches (cifar10.h)
//   synthetic                the deterministic synthetic set with defaults (synthetic.h)
//   synthetic:<k>=<v>,...    with keys n (train examples), test (test examples), classes,
//                            shape (CxHxW, e.g. 3x32x32), seed, noise; e.g.
//                            synthetic:n=512,test=128,classes=4,shape=1x8x8,seed=7,noise=0.2
// A <dir> is taken verbatim (it may contain ':' or ',') and must not be empty.
//
// Strings are absl::string_view: Debian's Abseil is built with its own string_view type, which
// std::string and string literals convert to (std::string_view does not).
//
// Errors: INVALID_ARGUMENT listing the valid forms, or naming the bad synthetic key or value.
// Thread-safety: free functions without shared state.
#ifndef QTRAIN_WORKER_DATA_DATA_SPEC_H_
#define QTRAIN_WORKER_DATA_DATA_SPEC_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "worker/data/synthetic.h"

namespace qtrain::data {

enum class DataSource { kFashionMnist, kIdx, kCifar10, kSynthetic };

inline constexpr char kDataSpecForms[] =
    "fashion-mnist, fashion-mnist:<dir>, idx:<dir>, cifar10:<dir>, synthetic, "
    "synthetic:n=<int>,test=<int>,classes=<int>,shape=<C>x<H>x<W>,seed=<int>,noise=<float>";

struct DataSpec {
  DataSource source = DataSource::kSynthetic;
  std::string dir;             // kFashionMnist (default dir filled in), kIdx, kCifar10
  SyntheticOptions synthetic;  // kSynthetic
};

absl::StatusOr<DataSpec> ParseDataSpec(absl::string_view spec);

// The canonical string of a spec; ParseDataSpec(DataSpecToString(s)) gives back s.
std::string DataSpecToString(const DataSpec& spec);

}  // namespace qtrain::data

#endif  // QTRAIN_WORKER_DATA_DATA_SPEC_H_
