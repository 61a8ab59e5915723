// First decode timing of the CUDA backend (issue 5, stage 1): Gemma shapes with random weights
// generated on the GPU (no checkpoint), batch B, every sequence at context C.
//
// One step issues exactly the op sequence of GemmaForCausalLM::forward at TP 1 (model/
// gemma_model.cpp): the i32 inputs go up with from_host_i32, activations come from the
// stream-ordered pool, and the logits come back with to_host_f32. Each sequence re-writes its
// slot C-1 every step, so every step attends over exactly C keys.
//
// Prints the median step time next to the HBM bound: (weight bytes + KV bytes read per step) /
// bandwidth, for the spec bandwidth given with --hbm-tbs (H100 SXM: 3.35 TB/s) and for the
// device-to-device copy bandwidth measured here. Then the time of each op of one layer, run
// back to back 50 times, so that it is clear where a step's time goes.
//
//   bench_cuda_decode --preset gemma-2b --batch 1 --context 512
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_backend.h"
#include "quilt/kernels/backend.h"
#include "runtime/core/check.h"

using namespace quilt;
using Clock = std::chrono::steady_clock;

namespace {

struct Shape {
  int layers, hidden, heads, kv_heads, head_dim, inter, vocab;
};

struct Layer {
  Tensor input_norm, post_norm, qkv, o, gate_up, down;
};

double seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string preset = "gemma-2b";
  int B = 1, C = 512, steps = 50;
  double hbm_tbs = 3.35;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() { return std::string(i + 1 < argc ? argv[++i] : ""); };
    if (a == "--preset") preset = next();
    else if (a == "--batch") B = std::stoi(next());
    else if (a == "--context") C = std::stoi(next());
    else if (a == "--steps") steps = std::stoi(next());
    else if (a == "--hbm-tbs") hbm_tbs = std::stod(next());
    else {
      std::fprintf(stderr, "usage: %s [--preset gemma-2b|gemma-7b] [--batch B] [--context C] [--steps N] [--hbm-tbs X]\n", argv[0]);
      return 2;
    }
  }
  Shape s{};
  if (preset == "gemma-2b") s = {18, 2048, 8, 1, 256, 16384, 256000};
  else if (preset == "gemma-7b") s = {28, 3072, 16, 16, 256, 24576, 256000};
  else {
    std::fprintf(stderr, "unknown preset %s\n", preset.c_str());
    return 2;
  }
  try {
    auto be = make_backend("cuda");  // bf16
    const DType dt = be->compute_dtype();
    const int64_t H = s.hidden, D = s.head_dim, Hq = s.heads, Hkv = s.kv_heads, I = s.inter, V = s.vocab;
    const int64_t qkv_w = (Hq + 2 * Hkv) * D;
    uint64_t seed = 1;
    size_t weight_bytes = 0;
    auto weight = [&](std::vector<int64_t> shape, float stddev) {
      Tensor t = be->empty(shape, dt);
      cuda_fill_normal(*be, t, seed++, stddev);
      weight_bytes += t.bytes();
      return t;
    };
    const Tensor embed = weight({V, H}, 0.02f);
    std::vector<Layer> layers;
    for (int l = 0; l < s.layers; ++l)
      layers.push_back({weight({H}, 0.1f), weight({H}, 0.1f), weight({qkv_w, H}, 1 / std::sqrt(float(H))),
                        weight({H, Hq * D}, 1 / std::sqrt(float(Hq * D))), weight({2 * I, H}, 1 / std::sqrt(float(H))),
                        weight({H, I}, 1 / std::sqrt(float(I)))});
    const Tensor final_norm = weight({H}, 0.1f);

    const int bs = 16, blocks_per_seq = (C + bs - 1) / bs;
    std::vector<Tensor> kc, vc;
    for (int l = 0; l < s.layers; ++l) {
      kc.push_back(be->kv_cache_tensor(int64_t{B} * blocks_per_seq, bs, s.kv_heads, s.head_dim));
      vc.push_back(be->kv_cache_tensor(int64_t{B} * blocks_per_seq, bs, s.kv_heads, s.head_dim));
      cuda_fill_normal(*be, kc.back(), seed++, 1.0f);
      cuda_fill_normal(*be, vc.back(), seed++, 1.0f);
    }
    cuda_synchronize(*be);

    // Decode inputs: sequence b owns blocks [b * blocks_per_seq, ...), decodes position C - 1.
    std::vector<int32_t> ids(B), pos(B, C - 1), slots(B), cu(B + 1), lens(B, C), tables(int64_t{B} * blocks_per_seq), rows(B);
    for (int b = 0; b < B; ++b) {
      ids[b] = (1000 + 7919 * b) % s.vocab;
      slots[b] = (b * blocks_per_seq + (C - 1) / bs) * bs + (C - 1) % bs;
      cu[b + 1] = b + 1;
      rows[b] = b;
      for (int k = 0; k < blocks_per_seq; ++k) tables[b * blocks_per_seq + k] = b * blocks_per_seq + k;
    }
    const RopeParams rp{s.heads, s.kv_heads, s.head_dim, 10000.f};
    const KvWriteParams kp{s.heads, s.kv_heads, s.head_dim, bs};
    const AttentionParams ap{s.heads, s.kv_heads, s.head_dim, bs, blocks_per_seq, static_cast<float>(1.0 / std::sqrt(double(D)))};
    std::vector<float> logits(static_cast<size_t>(B) * V);
    const float eps = 1e-6f;

    auto step = [&]() {
      const int64_t T = B;
      const Tensor tid = be->from_host_i32(ids.data(), {T});
      const Tensor tpos = be->from_host_i32(pos.data(), {T});
      const Tensor tslots = be->from_host_i32(slots.data(), {T});
      const Tensor tcu = be->from_host_i32(cu.data(), {T + 1});
      const Tensor tlens = be->from_host_i32(lens.data(), {T});
      const Tensor ttables = be->from_host_i32(tables.data(), {T, blocks_per_seq});
      Tensor x = be->empty({T, H}, dt), normed = be->empty({T, H}, dt), qkv = be->empty({T, qkv_w}, dt);
      Tensor attn = be->empty({T, Hq * D}, dt), proj = be->empty({T, H}, dt);
      Tensor gate_up = be->empty({T, 2 * I}, dt), act = be->empty({T, I}, dt);
      be->embedding(x, embed, tid, 0, std::sqrt(float(H)));
      be->rms_norm(normed, x, layers[0].input_norm, eps);
      for (int l = 0; l < s.layers; ++l) {
        const Layer& L = layers[l];
        be->matmul(qkv, normed, L.qkv, false);
        be->rope(qkv, tpos, rp);
        be->write_kv_cache(kc[l], vc[l], qkv, tslots, kp);
        be->paged_attention(attn, qkv, kc[l], vc[l], tcu, tlens, ttables, ap);
        be->matmul(proj, attn, L.o, false);
        be->add_rms_norm(x, normed, proj, L.post_norm, eps);
        be->matmul(gate_up, normed, L.gate_up, false);
        be->gelu_tanh_mul(act, gate_up);
        be->matmul(proj, act, L.down, false);
        be->add_rms_norm(x, normed, proj, l + 1 < s.layers ? layers[l + 1].input_norm : final_norm, eps);
      }
      const Tensor idx = be->from_host_i32(rows.data(), {T});
      Tensor h = be->empty({T, H}, dt), out = be->empty({T, V}, dt);
      be->gather_rows(h, normed, idx);
      be->matmul(out, h, embed, false);
      be->to_host_f32(logits.data(), out);
    };

    for (int w = 0; w < 5; ++w) step();
    std::vector<double> times;
    for (int k = 0; k < steps; ++k) {
      const auto t0 = Clock::now();
      step();
      times.push_back(seconds(t0, Clock::now()));
    }
    const double step_ms = median(times) * 1e3;
    bool finite = true;
    for (float v : logits) finite = finite && std::isfinite(v);

    // Device-to-device copy bandwidth (read + write) of 1 GiB.
    Tensor big_a = be->empty({int64_t{1} << 29}, dt), big_b = be->empty({int64_t{1} << 29}, dt);
    be->copy(big_b, big_a);
    cuda_synchronize(*be);
    const auto c0 = Clock::now();
    for (int k = 0; k < 10; ++k) be->copy(big_b, big_a);
    cuda_synchronize(*be);
    const double copy_tbs = 10.0 * 2 * big_a.bytes() / seconds(c0, Clock::now()) / 1e12;
    big_a = Tensor();
    big_b = Tensor();

    const double kv_bytes = double(s.layers) * B * C * Hkv * D * 2 /*k,v*/ * dtype_size(dt);
    const double bytes = double(weight_bytes) + kv_bytes;
    const double bound_spec_ms = bytes / (hbm_tbs * 1e12) * 1e3;
    const double bound_meas_ms = bytes / (copy_tbs * 1e12) * 1e3;
    std::printf("%s decode, bf16, batch %d, context %d, TP 1: median %.3f ms/step over %d steps (min %.3f)%s\n",
                preset.c_str(), B, C, step_ms, steps, *std::min_element(times.begin(), times.end()) * 1e3,
                finite ? "" : "  [non-finite logits]");
    std::printf("  bytes per step: weights %.3f GB + KV %.3f GB = %.3f GB\n", weight_bytes / 1e9, kv_bytes / 1e9, bytes / 1e9);
    std::printf("  HBM bound at %.2f TB/s (spec): %.3f ms -> measured/bound = %.2fx\n", hbm_tbs, bound_spec_ms, step_ms / bound_spec_ms);
    std::printf("  HBM bound at %.2f TB/s (measured D2D copy): %.3f ms -> measured/bound = %.2fx\n", copy_tbs, bound_meas_ms,
                step_ms / bound_meas_ms);

    // Where the time goes: each op of layer 0 (and the lm_head) back to back, 50 times.
    {
      const int64_t T = B;
      const Tensor tpos = be->from_host_i32(pos.data(), {T}), tslots = be->from_host_i32(slots.data(), {T});
      const Tensor tcu = be->from_host_i32(cu.data(), {T + 1}), tlens = be->from_host_i32(lens.data(), {T});
      const Tensor ttables = be->from_host_i32(tables.data(), {T, blocks_per_seq});
      Tensor x = be->zeros({T, H}, dt), normed = be->zeros({T, H}, dt), qkv = be->zeros({T, qkv_w}, dt);
      Tensor attn = be->zeros({T, Hq * D}, dt), proj = be->zeros({T, H}, dt);
      Tensor gate_up = be->zeros({T, 2 * I}, dt), act = be->zeros({T, I}, dt), out = be->empty({T, V}, dt);
      const Layer& L = layers[0];
      struct Op { const char* name; int per_step; double bytes; std::function<void()> run; };
      const double e = dtype_size(dt);
      const std::vector<Op> ops = {
          {"rms_norm/add_rms_norm", 2 * s.layers, 0, [&] { be->add_rms_norm(x, normed, proj, L.post_norm, eps); }},
          {"matmul qkv", s.layers, double(L.qkv.bytes()), [&] { be->matmul(qkv, normed, L.qkv, false); }},
          {"rope", s.layers, 0, [&] { be->rope(qkv, tpos, rp); }},
          {"write_kv_cache", s.layers, 0, [&] { be->write_kv_cache(kc[0], vc[0], qkv, tslots, kp); }},
          {"paged_attention", s.layers, double(B) * C * Hkv * D * 2 * e, [&] { be->paged_attention(attn, qkv, kc[0], vc[0], tcu, tlens, ttables, ap); }},
          {"matmul o", s.layers, double(L.o.bytes()), [&] { be->matmul(proj, attn, L.o, false); }},
          {"matmul gate_up", s.layers, double(L.gate_up.bytes()), [&] { be->matmul(gate_up, normed, L.gate_up, false); }},
          {"gelu_tanh_mul", s.layers, 0, [&] { be->gelu_tanh_mul(act, gate_up); }},
          {"matmul down", s.layers, double(L.down.bytes()), [&] { be->matmul(proj, act, L.down, false); }},
          {"matmul lm_head", 1, double(embed.bytes()), [&] { be->matmul(out, normed, embed, false); }},
      };
      double total = 0;
      std::printf("  per op (50 back-to-back launches each; weight/KV bytes over the op's time):\n");
      for (const Op& op : ops) {
        op.run();
        cuda_synchronize(*be);
        const auto t0 = Clock::now();
        for (int k = 0; k < 50; ++k) op.run();
        cuda_synchronize(*be);
        const double us = seconds(t0, Clock::now()) / 50 * 1e6;
        total += us * op.per_step;
        if (op.bytes > 0)
          std::printf("    %-22s %8.1f us x %3d = %8.1f us   %6.2f TB/s\n", op.name, us, op.per_step, us * op.per_step,
                      op.bytes / (us * 1e-6) / 1e12);
        else
          std::printf("    %-22s %8.1f us x %3d = %8.1f us\n", op.name, us, op.per_step, us * op.per_step);
      }
      std::printf("  sum of ops: %.3f ms; the rest of the step (%.3f ms) is launch gaps, input uploads, allocation and"
                  " the logits download\n", total / 1e3, step_ms - total / 1e3);
    }
  } catch (const quilt::Error& e) {
    std::fprintf(stderr, "bench_cuda_decode: %s\n", e.what());
    return 1;
  }
  return 0;
}
