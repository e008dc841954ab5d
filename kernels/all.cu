// fused-margin: the translation unit NVRTC compiles, once per input dtype (-DFM_DTYPE=...) and
// architecture. build.rs inlines every #include (once each), since NVRTC sees no files.
#include "common.cuh"
#include "tile.cuh"
#include "args.cuh"
#include "normalize.cu"
#include "logits.cu"
#include "logits_tc.cu"
#include "logits_wg.cu"
#include "combine.cu"
#include "labels.cu"
#include "grad.cu"
#include "grad_tc.cu"
#include "naive.cu"
