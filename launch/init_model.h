#pragma once
// `quilt init-model DIR`: a tiny random Gemma checkpoint in Hugging Face layout (config.json,
// model.safetensors, tokenizer.model, tokenizer_config.json, generation_config.json) with two demo
// PEFT LoRA adapters under DIR/adapters/, deterministic by seed. Its weights are random: it
// exists so that the serving job and its API can be tried without downloading anything.
#include <cstdint>
#include <string>

namespace quilt {

// Writes the checkpoint into `dir` (created; existing files are replaced).
void write_tiny_model(const std::string& dir, uint64_t seed);

// The default model of `quilt serve`: $XDG_CACHE_HOME/quilt/tiny-gemma-seed<seed> (or
// ~/.cache/quilt/...), written on first use and reused afterwards. Returns the folder.
std::string default_model_dir(uint64_t seed = 0);

}  // namespace quilt
