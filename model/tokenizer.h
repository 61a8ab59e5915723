#pragma once
#include <memory>
#include <string>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace quilt {

// Gemma's tokenizer: sentencepiece's tokenizer.model, with BOS/EOS handling from
// tokenizer_config.json (add_bos_token defaults to true, add_eos_token to false).
class Tokenizer {
 public:
  static std::unique_ptr<Tokenizer> load(const std::string& model_dir);
  ~Tokenizer();

  // Ids of `text`, with BOS (and EOS) added as the tokenizer config asks.
  std::vector<int> encode(const std::string& text) const;
  // Ids of `text` alone, no special tokens.
  std::vector<int> encode_raw(const std::string& text) const;
  std::string decode(const std::vector<int>& ids) const;
  std::string id_to_piece(int id) const;
  int piece_to_id(const std::string& piece) const;  // -1 when the piece is unknown
  bool is_special(int id) const;                     // control (bos/eos/pad) or unknown
  int vocab_size() const;
  int bos_id() const { return bos_id_; }
  int eos_id() const { return eos_id_; }
  int pad_id() const { return pad_id_; }
  bool add_bos() const { return add_bos_; }

 private:
  Tokenizer() = default;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  int bos_id_ = -1, eos_id_ = -1, pad_id_ = -1;
  bool add_bos_ = true, add_eos_ = false;
};

}  // namespace quilt
