#include "model/tokenizer.h"

#include <sentencepiece_processor.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "runtime/core/check.h"

namespace quilt {
namespace fs = std::filesystem;

Tokenizer::~Tokenizer() = default;

std::unique_ptr<Tokenizer> Tokenizer::load(const std::string& model_dir) {
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  const fs::path path = fs::path(model_dir) / "tokenizer.model";
  QUILT_REQUIRE(fs::exists(path), "model folder '", model_dir,
                "' has no tokenizer.model (Quilt reads Gemma's sentencepiece tokenizer)");
  t->sp_ = std::make_unique<sentencepiece::SentencePieceProcessor>();
  const auto status = t->sp_->Load(path.string());
  QUILT_REQUIRE(status.ok(), "cannot load tokenizer '", path.string(), "': ", status.ToString());
  t->bos_id_ = t->sp_->bos_id();
  t->eos_id_ = t->sp_->eos_id();
  t->pad_id_ = t->sp_->pad_id();

  const fs::path cfg = fs::path(model_dir) / "tokenizer_config.json";
  if (fs::exists(cfg)) {
    std::ifstream in(cfg);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      QUILT_FAIL("'", cfg.string(), "' is not valid JSON (", e.what(), ")");
    }
    if (j.contains("add_bos_token") && j["add_bos_token"].is_boolean()) t->add_bos_ = j["add_bos_token"].get<bool>();
    if (j.contains("add_eos_token") && j["add_eos_token"].is_boolean()) t->add_eos_ = j["add_eos_token"].get<bool>();
    auto special = [&](const char* key, int& id) {
      if (!j.contains(key)) return;
      const auto& v = j[key];
      std::string piece = v.is_string() ? v.get<std::string>()
                          : (v.is_object() && v.contains("content")) ? v["content"].get<std::string>()
                                                                      : "";
      if (piece.empty()) return;
      const int found = t->piece_to_id(piece);
      QUILT_REQUIRE(found >= 0, "'", cfg.string(), "': ", key, " \"", piece, "\" is not in tokenizer.model");
      id = found;
    };
    special("bos_token", t->bos_id_);
    special("eos_token", t->eos_id_);
    special("pad_token", t->pad_id_);
  }
  QUILT_REQUIRE(!t->add_bos_ || t->bos_id_ >= 0, "tokenizer '", path.string(),
                "' has no BOS token but add_bos_token is true");
  return t;
}

std::vector<int> Tokenizer::encode_raw(const std::string& text) const {
  std::vector<int> ids;
  const auto status = sp_->Encode(text, &ids);
  QUILT_REQUIRE(status.ok(), "tokenizer: cannot encode text: ", status.ToString());
  return ids;
}

std::vector<int> Tokenizer::encode(const std::string& text) const {
  std::vector<int> ids;
  if (add_bos_) ids.push_back(bos_id_);
  const auto body = encode_raw(text);
  ids.insert(ids.end(), body.begin(), body.end());
  if (add_eos_) ids.push_back(eos_id_);
  return ids;
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
  std::string out;
  const int n = vocab_size();
  for (int id : ids) QUILT_REQUIRE(id >= 0 && id < n, "tokenizer: id ", id, " outside the vocabulary of ", n);
  const auto status = sp_->Decode(ids, &out);
  QUILT_REQUIRE(status.ok(), "tokenizer: cannot decode: ", status.ToString());
  return out;
}

std::string Tokenizer::id_to_piece(int id) const {
  QUILT_REQUIRE(id >= 0 && id < vocab_size(), "tokenizer: id ", id, " outside the vocabulary");
  return sp_->IdToPiece(id);
}

int Tokenizer::piece_to_id(const std::string& piece) const {
  const int id = sp_->PieceToId(piece);
  if (id == sp_->unk_id() && piece != sp_->IdToPiece(id)) return -1;
  return id;
}

bool Tokenizer::is_special(int id) const { return sp_->IsControl(id) || sp_->IsUnknown(id); }

int Tokenizer::vocab_size() const { return sp_->GetPieceSize(); }

}  // namespace quilt
