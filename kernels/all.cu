// fused-margin: the translation unit NVRTC compiles, once per input dtype (-DFM_DTYPE=...),
// architecture and compile unit (-DFM_UNIT=..., geometry.cuh: the host compiles only the units a
// plan launches; without it, every unit). build.rs inlines every #include (once each), since NVRTC
// sees no files.
#include "common.cuh"
#include "tile.cuh"
#include "args.cuh"
#if FM_IN_UNIT(FM_G_UNIT_CORE)
#include "normalize.cu"
#include "combine.cu"
#include "labels.cu"
#include "state.cu"
#endif
#if FM_IN_UNIT(FM_G_UNIT_FWD_SIMT)
#include "logits.cu"
#endif
#if FM_IN_UNIT(FM_G_UNIT_FWD_TC) || FM_IN_UNIT(FM_G_UNIT_FWD_TC_WIDE)
#include "logits_tc.cu"
#endif
#if FM_IN_UNIT(FM_G_UNIT_FWD_WG)
#include "logits_wg.cu"
#endif
#if FM_IN_UNIT(FM_G_UNIT_GRAD_SIMT)
#include "grad.cu"
#endif
#if FM_IN_UNIT(FM_G_UNIT_GRAD_TC64) || FM_IN_UNIT(FM_G_UNIT_GRAD_TC32) || \
    FM_IN_UNIT(FM_G_UNIT_GRAD_TC64_F32OUT) || FM_IN_UNIT(FM_G_UNIT_GRAD_TC32_F32OUT)
#include "grad_tc.cu"
#endif
#if FM_IN_UNIT(FM_G_UNIT_NAIVE)
#include "naive.cu"
#endif
