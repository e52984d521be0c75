// The 16-entry code books of bitsandbytes' 4-bit formats, usable on host and device.
//
// NF4 values are quantiles of N(0, 1) (QLoRA); FP4 is sign + 2-bit exponent + 1-bit mantissa,
// normalised to [-1, 1]. Entry 8 of FP4 is -0.0: bitsandbytes' CUDA and native CPU kernels
// compute sign * 0.0 there, and we match their bits.
#pragma once

namespace fastpeft {

enum class Quant4bitType : int { NF4 = 1, FP4 = 2 };

constexpr float kNF4Code[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// 0, 0.0625, 8, 12, 4, 6, 2, 3 divided by 12, then the negatives.
constexpr float kFP4Code[16] = {
    0.0f,  0.005208333333333333f,  0.6666666666666666f,  1.0f,
    0.3333333333333333f,  0.5f,  0.16666666666666666f,  0.25f,
    -0.0f, -0.005208333333333333f, -0.6666666666666666f, -1.0f,
    -0.3333333333333333f, -0.5f, -0.16666666666666666f, -0.25f,
};

inline const float* quant4bit_code(Quant4bitType type) {
  return type == Quant4bitType::NF4 ? kNF4Code : kFP4Code;
}

}  // namespace fastpeft
