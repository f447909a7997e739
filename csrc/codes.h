// The integer codes the op schemas carry (a torch.library schema has no enum type), in one place
// for the CPU and CUDA kernels. The Python home is cetnet_kernels/codes.py; the two are checked
// against each other through cetnet_kernels._C.codes() (tests/kernels/test_codes.py), which reads the
// name tables below.
#pragma once

#include <cstdint>

namespace cetnet {

// How a feature's ids arrive in the multi-table embedding ops (`modes`, one per feature).
enum InputMode : int64_t { kIds = 0, kBagSum = 1, kBagMean = 2, kBagWeightedSum = 3 };
inline bool is_bag(int64_t mode) { return mode != kIds; }

// What the embedding backward does with a row's gradient (`optimizer` of
// multi_embedding_update, which takes kSGD and kRowwiseAdagrad; kDense is the plain backward).
enum Optimizer : int64_t { kDense = 0, kSGD = 1, kRowwiseAdagrad = 2 };

// What the embedding ops do with an id outside [0, vocab) other than padding_idx (`bounds_check`):
// kBoundsError raises IndexError naming the feature, batch row, position and id (on CUDA after
// one device-to-host copy of the per-feature records per call); kBoundsOff never checks on the
// host (no synchronization): such an id reads as a zero vector and gets no gradient or update,
// exactly like padding_idx, and nothing out of bounds is ever read. kBoundsWarn is kBoundsOff
// plus the lookup's check: the lookup warns (naming the first such id, and how many there
// were) instead of raising, and malformed bag offsets still raise; backward and the fused
// update do not check again (on CUDA, while the ids are valid, one synchronization per step:
// the lookup's).
enum BoundsCheck : int64_t { kBoundsError = 0, kBoundsOff = 1, kBoundsWarn = 2 };

// How collaborative_loss reduces its per-row loss (the values of at::Reduction).
enum Reduction : int64_t { kReduceNone = 0, kReduceMean = 1, kReduceSum = 2 };

// The member names of the Python IntEnums, for _C.codes().
struct CodeName {
  const char* name;
  int64_t value;
};
inline constexpr CodeName kInputModeNames[] = {
    {"IDS", kIds}, {"BAG_SUM", kBagSum}, {"BAG_MEAN", kBagMean},
    {"BAG_WEIGHTED_SUM", kBagWeightedSum}};
inline constexpr CodeName kOptimizerNames[] = {
    {"DENSE", kDense}, {"SGD", kSGD}, {"ROWWISE_ADAGRAD", kRowwiseAdagrad}};
inline constexpr CodeName kBoundsCheckNames[] = {
    {"ERROR", kBoundsError}, {"OFF", kBoundsOff}, {"WARN", kBoundsWarn}};
inline constexpr CodeName kReductionNames[] = {
    {"NONE", kReduceNone}, {"MEAN", kReduceMean}, {"SUM", kReduceSum}};

}  // namespace cetnet
