// The Python extension module cetnet_kernels._C. Importing it runs the static op registrations
// (registration.cpp); build_info() says what was compiled, codes() and table_layout() expose the
// shared definitions to the Python tests. Not part of the libtorch (CMake) build.
#include <torch/extension.h>
#include <torch/version.h>

#include "build_info.h"
#include "codes.h"
#include "embedding_args.h"
#include "embedding_layout.h"

#include "cpu/dispatch.h"
#include "kernels.h"

namespace {

template <size_t N>
pybind11::dict code_dict(const cetnet::CodeName (&names)[N]) {
  pybind11::dict d;
  for (const auto& c : names) d[c.name] = c.value;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cetnet compiled kernels (CPU C++, optional CUDA)";
  m.def(
      "build_info",
      [] {
        pybind11::dict info;
        info["cpu"] = true;
        // The call makes the choice: a bad CETNET_CPU_CAPABILITY is an error at import.
        info["cpu_capability"] = cetnet::cpu::capability();
        info["cpu_capabilities"] = cetnet::cpu::compiled_capabilities();
        info["cpu_capabilities_runnable"] = cetnet::cpu::runnable_capabilities();
        info["cuda"] = cetnet::with_cuda();
#ifdef CETNET_WITH_CUDA
        info["cuda_archs"] = cetnet::cuda::compiled_archs();
        info["cuda_version"] = cetnet::cuda::cuda_version();
#else
        info["cuda_archs"] = pybind11::list();
        info["cuda_version"] = pybind11::none();
#endif
        info["torch_version"] = TORCH_VERSION;
        return info;
      },
      "Which backends and CPU kernel builds (vector ISAs) cetnet_kernels._C contains, and the "
      "one in use.");
  m.def("first_bad_id_warning", &cetnet::first_bad_id_warning, pybind11::arg("feature"),
        "bounds_check='warn': True the first time `feature` has an out-of-range id (then the "
        "lookup warns), False after (bad_id_warnings.cpp).");
  m.def("bad_id_warned", &cetnet::bad_id_warned, pybind11::arg("feature"),
        "bounds_check='warn': whether `feature` has been warned about.");
  m.def("reset_bad_id_warnings", &cetnet::reset_bad_id_warnings,
        "Forget which features bounds_check='warn' has warned about.");
  m.def("set_cpu_capability", &cetnet::cpu::set_capability, pybind11::arg("name"),
        "Run the CPU ops with the kernel build `name` (default, avx2 or avx512) from now on.");
  m.def(
      "codes",
      [] {
        pybind11::dict codes;
        codes["InputMode"] = code_dict(cetnet::kInputModeNames);
        codes["Optimizer"] = code_dict(cetnet::kOptimizerNames);
        codes["Reduction"] = code_dict(cetnet::kReductionNames);
        codes["BoundsCheck"] = code_dict(cetnet::kBoundsCheckNames);
        return codes;
      },
      "The integer codes of the op schemas (csrc/codes.h), by the member names of "
      "cetnet_kernels.codes' IntEnums.");
  m.def(
      "table_layout",
      [](std::vector<int64_t> dims, std::vector<int64_t> vocab,
         std::optional<std::vector<int64_t>> ncols) {
        const char* op = "cetnet::table_layout";
        const int64_t F = static_cast<int64_t>(vocab.size());
        cetnet::TableLayout L;
        L.set_tables(dims, vocab, cetnet::split_names("", F), op);
        std::vector<int64_t> cols = ncols.value_or(std::vector<int64_t>(F, 1));
        TORCH_CHECK_VALUE(static_cast<int64_t>(cols.size()) == F, op,
                          ": ncols needs one entry per feature (", F, "), got ", cols.size());
        for (int64_t f = 0; f < F; ++f)
          TORCH_CHECK_VALUE(cols[f] >= 0, op, ": ncols[", f, "] must be >= 0, got ", cols[f]);
        L.set_columns(std::move(cols), op);
        pybind11::dict d;
        d["M"] = L.M;
        d["F"] = L.F;
        d["dims"] = L.dims;
        d["vocab"] = L.vocab;
        d["ncols"] = L.ncols;
        d["Vtot"] = L.Vtot;
        d["weight_numel"] = L.weight_numel;
        d["state_rows"] = L.state_rows;
        d["max_dim"] = L.max_dim;
        d["N"] = L.N;
        d["row_base"] = L.row_base;
        d["table_base"] = L.table_base;
        d["table_off"] = L.table_off;
        d["state_off"] = L.state_off;
        d["col_start"] = L.col_start;
        return d;
      },
      pybind11::arg("dims"), pybind11::arg("vocab"), pybind11::arg("ncols") = pybind11::none(),
      "The flat table layout of the multi-table embedding (csrc/embedding_layout.h) for member "
      "dims [M], vocabulary sizes [F] and output columns per feature [F] (default: 1 each).");
}
