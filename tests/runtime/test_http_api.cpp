// The HTTP API's bodies without a socket: parsing and validation of every generation route,
// Gemma's chat template against the golden fixture's chat prompt, the JSON shapes that
// lorax-client and openai read, and the stream writer's event sequences.
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "runtime/http/api.h"
#include "tests/model/fixtures.h"

using namespace quilt;
using namespace quilt::http;
using nlohmann::json;

namespace {

ServeConfig config() {
  ServeConfig c;
  c.model_id = "tiny-gemma";
  c.max_input_length = 64;
  c.max_total_tokens = 100;
  c.default_max_new_tokens = 7;
  c.max_stop_sequences = 2;
  return c;
}

struct ApiTest : ::testing::Test {
  void SetUp() override {
    fixtures = quilt::testing::load_fixtures();
    fx = &fixtures.front();
    tok = Tokenizer::load(fx->dir);
    ModelInfo info;
    info.model_id = "tiny-gemma";
    info.eos_ids = {1};
    api = std::make_unique<Api>(config(), *tok, info);
  }
  Job ok(Route r, const std::string& body, uint64_t seed = 99) {
    auto res = api->parse(r, body, seed, 1700000000, 1);
    if (auto* f = std::get_if<Failure>(&res)) {
      ADD_FAILURE() << "unexpected failure: " << f->message << " for " << body;
      return Job{};
    }
    return std::get<Job>(res);
  }
  Failure bad(Route r, const std::string& body) {
    auto res = api->parse(r, body, 99, 1700000000, 1);
    if (auto* f = std::get_if<Failure>(&res)) return *f;
    ADD_FAILURE() << "expected a failure for " << body;
    return Failure{};
  }
  std::vector<quilt::testing::Fixture> fixtures;
  const quilt::testing::Fixture* fx = nullptr;
  std::unique_ptr<Tokenizer> tok;
  std::unique_ptr<Api> api;
};

TokenEvent token(int id, std::string text, float lp = -0.5f) {
  TokenEvent t;
  t.id = id;
  t.text = std::move(text);
  t.logprob = lp;
  return t;
}

std::vector<json> events(const std::string& sse) {
  std::vector<json> out;
  size_t pos = 0;
  while ((pos = sse.find("data: ", pos)) != std::string::npos) {
    const size_t end = sse.find("\n\n", pos);
    const std::string payload = sse.substr(pos + 6, end - pos - 6);
    out.push_back(payload == "[DONE]" ? json("[DONE]") : json::parse(payload));
    pos = end;
  }
  return out;
}

}  // namespace

TEST_F(ApiTest, NativeDefaultsTokenizeWithBosAndStayGreedy) {
  const Job j = ok(Route::generate, R"({"inputs": "The keeper wrote"})");
  EXPECT_EQ(j.req.prompt_ids, tok->encode("The keeper wrote"));
  EXPECT_EQ(j.req.prompt_ids.front(), tok->bos_id());
  EXPECT_EQ(j.req.sampling.max_new_tokens, 7);
  EXPECT_FALSE(j.req.sampling.do_sample);
  EXPECT_FALSE(j.sampled);
  EXPECT_EQ(j.req.route, "generate");
  EXPECT_FALSE(j.stream);
  EXPECT_TRUE(j.req.adapter.empty());
}

TEST_F(ApiTest, NativeParametersReachTheRequest) {
  // lorax-client sends every field, nulls included, and fields Quilt does not know.
  const Job j = ok(Route::compat, R"({"inputs": "abc", "stream": true, "parameters": {
      "adapter_id": "a-r4-qv", "adapter_source": "local", "merged_adapters": null, "api_token": null,
      "best_of": null, "temperature": 0.5, "repetition_penalty": 1.1, "frequency_penalty": 0.2,
      "presence_penalty": -0.3, "top_k": 5, "top_p": 0.9, "typical_p": null, "do_sample": false,
      "max_new_tokens": 3, "ignore_eos_token": true, "return_full_text": true, "stop": ["x", "yz"],
      "truncate": null, "watermark": false, "details": true, "decoder_input_details": false,
      "return_k_alternatives": 2, "seed": 12345678901234, "response_format": null, "unknown": 1}})");
  EXPECT_TRUE(j.stream);
  EXPECT_EQ(j.req.adapter, "a-r4-qv");
  EXPECT_FLOAT_EQ(j.req.sampling.temperature, 0.5f);
  EXPECT_FLOAT_EQ(j.req.sampling.repetition_penalty, 1.1f);
  EXPECT_FLOAT_EQ(j.req.sampling.frequency_penalty, 0.2f);
  EXPECT_FLOAT_EQ(j.req.sampling.presence_penalty, -0.3f);
  EXPECT_EQ(j.req.sampling.top_k, 5);
  EXPECT_FLOAT_EQ(j.req.sampling.top_p, 0.9f);
  EXPECT_TRUE(j.req.sampling.do_sample);  // warpers imply sampling
  EXPECT_TRUE(j.sampled);
  EXPECT_EQ(j.req.sampling.seed, 12345678901234u);
  EXPECT_EQ(j.req.sampling.max_new_tokens, 3);
  EXPECT_EQ(j.req.sampling.top_n_alternatives, 2);
  EXPECT_TRUE(j.req.ignore_eos_token);
  EXPECT_EQ(j.req.stop, (std::vector<std::string>{"x", "yz"}));
  EXPECT_EQ(j.prefix, "abc");
  EXPECT_TRUE(j.details);
}

TEST_F(ApiTest, SamplingWithoutSeedGetsTheRandomOne) {
  const Job j = ok(Route::generate, R"({"inputs": "abc", "parameters": {"do_sample": true}})", 4242);
  EXPECT_TRUE(j.sampled);
  EXPECT_EQ(j.req.sampling.seed, 4242u);
  const Job g = ok(Route::generate, R"({"inputs": "abc"})", 4242);
  EXPECT_FALSE(g.sampled);
}

TEST_F(ApiTest, OutOfRangeParametersAre422WithTheirName) {
  struct Case {
    const char* params;
    const char* param;
  };
  const Case cases[] = {
      {R"({"temperature": 0})", "temperature"},
      {R"({"temperature": -1})", "temperature"},
      {R"({"temperature": "hot"})", "temperature"},
      {R"({"top_p": 0})", "top_p"},
      {R"({"top_p": 1.5})", "top_p"},
      {R"({"top_k": 0})", "top_k"},
      {R"({"top_k": 2.5})", "top_k"},
      {R"({"typical_p": 0})", "typical_p"},
      {R"({"repetition_penalty": 0})", "repetition_penalty"},
      {R"({"frequency_penalty": 3})", "frequency_penalty"},
      {R"({"max_new_tokens": 0})", "max_new_tokens"},
      {R"({"max_new_tokens": -4})", "max_new_tokens"},
      {R"({"stop": ["a", "b", "c"]})", "stop"},
      {R"({"stop": [""]})", "stop"},
      {R"({"stop": [1]})", "stop"},
      {R"({"best_of": 2})", "best_of"},
      {R"({"best_of": 0})", "best_of"},
      {R"({"truncate": 0})", "truncate"},
      {R"({"truncate": 65})", "truncate"},
      {R"({"seed": -1})", "seed"},
      {R"({"return_k_alternatives": 0})", "return_k_alternatives"},
      {R"({"adapter_source": "ftp"})", "adapter_source"},
      {R"({"watermark": true})", "watermark"},
      {R"({"do_sample": 1})", "do_sample"},
  };
  for (const auto& c : cases) {
    const Failure f = bad(Route::generate, std::string(R"({"inputs": "abc", "parameters": )") + c.params + "}");
    EXPECT_EQ(f.status, 422) << c.params;
    EXPECT_EQ(f.type, "validation") << c.params;
    EXPECT_EQ(f.param, c.param) << c.params << ": " << f.message;
  }
  EXPECT_EQ(bad(Route::generate_stream, R"({"inputs": "abc", "parameters": {"decoder_input_details": true}})").param,
            "decoder_input_details");
}

TEST_F(ApiTest, MalformedBodiesAre422AndNeverCrash) {
  for (const std::string& body : std::vector<std::string>{std::string(""), std::string("{"), std::string("[1, 2]"), std::string("\"x\""),
                                 std::string(R"({"inputs": 5})"), std::string(R"({"inputs": ""})"),
                                 std::string(R"({"inputs": "a", "parameters": 3})"), std::string(200000, '['),
                                 std::string("{\"inputs\": \"\xff\xfe\"}")}) {
    const Failure f = bad(Route::generate, body);
    EXPECT_EQ(f.status, 422) << body.substr(0, 40);
  }
}

TEST_F(ApiTest, PromptLimitsFollowTheConfig) {
  std::string long_text;
  for (int i = 0; i < 80; ++i) long_text += "the keeper wrote ";
  const Failure too_long = bad(Route::generate, json{{"inputs", long_text}}.dump());
  EXPECT_NE(too_long.message.find("must have less than 64 tokens"), std::string::npos) << too_long.message;
  // truncate keeps BOS and the last tokens
  const Job t = ok(Route::generate, json{{"inputs", long_text}, {"parameters", {{"truncate", 10}}}}.dump());
  const auto all = tok->encode(long_text);
  ASSERT_EQ(t.req.prompt_ids.size(), 10u);
  EXPECT_EQ(t.req.prompt_ids[0], tok->bos_id());
  EXPECT_EQ(std::vector<int>(t.req.prompt_ids.begin() + 1, t.req.prompt_ids.end()),
            std::vector<int>(all.end() - 9, all.end()));
  // prompt + max_new_tokens over max_total_tokens
  const Failure total = bad(Route::generate, json{{"inputs", "The keeper wrote"}, {"parameters", {{"max_new_tokens", 95}}}}.dump());
  EXPECT_NE(total.message.find("must be <= 100"), std::string::npos) << total.message;
}

TEST_F(ApiTest, ChatTemplateMatchesTheGoldenChatPrompt) {
  // The fixture's second prompt is Gemma's template around one user turn, tokenized by HF.
  const auto* chat_case = fx->base_cases()[1];
  ASSERT_EQ(chat_case->prompt.rfind("<start_of_turn>user\n", 0), 0u);
  const std::string content = chat_case->prompt.substr(20, chat_case->prompt.find("<end_of_turn>") - 20);
  auto ids = api->chat_prompt({{"user", content}});
  ASSERT_TRUE(std::holds_alternative<std::vector<int>>(ids)) << std::get<Failure>(ids).message;
  EXPECT_EQ(std::get<std::vector<int>>(ids), chat_case->prompt_ids);
  const Job j = ok(Route::chat, json{{"model", "tiny-gemma"}, {"messages", {{{"role", "user"}, {"content", content}}}}}.dump());
  EXPECT_EQ(j.req.prompt_ids, chat_case->prompt_ids);
  EXPECT_EQ(std::count(j.req.prompt_ids.begin(), j.req.prompt_ids.end(), tok->bos_id()), 1);
  EXPECT_EQ(j.req.stop, std::vector<std::string>{"<end_of_turn>"});  // <end_of_turn> stops the answer
  EXPECT_TRUE(j.req.adapter.empty());                               // the base model's id
}

TEST_F(ApiTest, ChatFoldsSystemAndAlternatesTurns) {
  auto render = [&](std::vector<ChatMessage> m) {
    auto r = api->chat_prompt(m);
    if (auto* f = std::get_if<Failure>(&r)) return "ERROR " + f->message;
    return tok->decode(std::get<std::vector<int>>(r));
  };
  EXPECT_EQ(render({{"system", "Be brief."}, {"user", " Hi "}, {"assistant", "Hello"}, {"user", "Sea?"}}),
            "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
            "<start_of_turn>user\nSea?<end_of_turn>\n<start_of_turn>model\n");
  EXPECT_EQ(render({{"user", "a"}, {"user", "b"}}).rfind("ERROR", 0), 0u);
  EXPECT_EQ(render({{"assistant", "a"}}).rfind("ERROR", 0), 0u);
  EXPECT_EQ(render({{"user", "a"}, {"system", "b"}}).rfind("ERROR", 0), 0u);
  EXPECT_EQ(render({{"tool", "a"}}).rfind("ERROR", 0), 0u);
  EXPECT_EQ(render({{"system", "only"}}).rfind("ERROR", 0), 0u);
  EXPECT_EQ(bad(Route::chat, R"({"model": "", "messages": []})").param, "messages");
  EXPECT_EQ(bad(Route::chat, R"({"model": "", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})").param,
            "messages");
  // content parts of type text are joined
  const Job j = ok(Route::chat, R"({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]})");
  EXPECT_EQ(tok->decode(j.req.prompt_ids), "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n");
}

TEST_F(ApiTest, OpenAIParameters) {
  Job j = ok(Route::completions, R"({"model": "tiny-gemma", "prompt": "abc", "temperature": 0, "max_tokens": 4,
                                     "stop": "x", "stream": true, "stream_options": {"include_usage": true}})");
  EXPECT_FALSE(j.sampled);  // temperature 0 is greedy
  EXPECT_EQ(j.req.sampling.max_new_tokens, 4);
  EXPECT_EQ(j.req.stop, std::vector<std::string>{"x"});
  EXPECT_TRUE(j.stream);
  EXPECT_TRUE(j.include_usage);
  EXPECT_EQ(j.model, "tiny-gemma");
  EXPECT_EQ(j.id.rfind("cmpl-", 0), 0u);
  j = ok(Route::completions, R"({"model": "a-r4-qv", "prompt": ["abc"], "temperature": 1.0, "seed": 5})");
  EXPECT_EQ(j.req.adapter, "a-r4-qv");  // any other model names an adapter
  EXPECT_TRUE(j.sampled);               // an explicit temperature samples, even at 1.0
  EXPECT_EQ(j.req.sampling.seed, 5u);
  j = ok(Route::completions, R"({"prompt": "abc"})");
  EXPECT_FALSE(j.sampled);  // LoRAX's default: greedy
  EXPECT_EQ(j.model, "tiny-gemma");
  j = ok(Route::chat, R"({"model": "", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3})");
  EXPECT_EQ(j.req.sampling.max_new_tokens, 3);
  EXPECT_EQ(j.id.rfind("chatcmpl-", 0), 0u);
  for (const char* body : {R"({"prompt": "abc", "n": 2})", R"({"prompt": "abc", "temperature": -1})",
                           R"({"prompt": "abc", "max_tokens": 0})", R"({"prompt": "abc", "logit_bias": {"5": 1}})",
                           R"({"prompt": ["a", "b"]})", R"({"prompt": ""})", R"({"prompt": "abc", "logprobs": 9})",
                           R"({"prompt": "abc", "stream": true, "logprobs": 1})"}) {
    EXPECT_EQ(bad(Route::completions, body).status, 422) << body;
  }
}

TEST_F(ApiTest, NativeAnswerShapes) {
  Job j = ok(Route::generate, R"({"inputs": "The keeper wrote", "parameters": {"details": true,
      "decoder_input_details": true, "return_k_alternatives": 1, "do_sample": true, "seed": 7}})");
  FinishEvent f;
  f.reason = FinishReason::eos_token;
  f.generated_text = " the";
  f.prompt_tokens = static_cast<int>(j.req.prompt_ids.size());
  f.generated_tokens = 2;
  f.seed = 7;
  f.prompt_logprobs.assign(j.req.prompt_ids.size(), -1.25f);
  f.prompt_logprobs[0] = std::nanf("");
  TokenEvent a = token(257, " the", -0.1f);
  a.alternatives = {{257, -0.1f}};
  TokenEvent eos = token(1, "", -0.2f);
  eos.special = true;
  eos.alternatives = {{1, -0.2f}};
  f.tokens = {a, eos};
  const json o = json::parse(api->answer(j, f));
  EXPECT_EQ(o["generated_text"], " the");
  const json& d = o["details"];
  EXPECT_EQ(d["finish_reason"], "eos_token");
  EXPECT_EQ(d["prompt_tokens"], f.prompt_tokens);
  EXPECT_EQ(d["generated_tokens"], 2);
  EXPECT_EQ(d["seed"], 7);
  ASSERT_EQ(d["prefill"].size(), j.req.prompt_ids.size());
  EXPECT_TRUE(d["prefill"][0]["logprob"].is_null());
  EXPECT_EQ(d["prefill"][0]["text"], "<bos>");
  EXPECT_DOUBLE_EQ(d["prefill"][1]["logprob"].get<double>(), -1.25);
  EXPECT_EQ(d["tokens"][1]["special"], true);
  EXPECT_EQ(d["tokens"][0]["alternative_tokens"][0]["id"], 257);
  // the compat route answers a one-element array; without details there is no details key
  j = ok(Route::compat, R"({"inputs": "The keeper wrote"})");
  const json c = json::parse(api->answer(j, f));
  ASSERT_TRUE(c.is_array());
  EXPECT_EQ(c[0]["generated_text"], " the");
  EXPECT_FALSE(c[0].contains("details"));
}

TEST_F(ApiTest, OpenAIAnswersCutStopSequences) {
  Job j = ok(Route::chat, R"({"model": "tiny-gemma", "messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 1})");
  FinishEvent f;
  f.reason = FinishReason::stop_sequence;
  f.generated_text = "Hello<end_of_turn>";
  f.stop_at = 5;
  f.prompt_tokens = 10;
  f.generated_tokens = 2;
  TokenEvent h = token(300, "Hello");
  h.alternatives = {{300, -0.5f}};
  f.tokens = {h, token(5, "<end_of_turn>")};
  json o = json::parse(api->answer(j, f));
  EXPECT_EQ(o["object"], "chat.completion");
  EXPECT_EQ(o["model"], "tiny-gemma");
  EXPECT_EQ(o["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(o["choices"][0]["message"]["content"], "Hello");
  EXPECT_EQ(o["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(o["choices"][0]["logprobs"]["content"][0]["token"], "Hello");
  EXPECT_EQ(o["usage"], (json{{"prompt_tokens", 10}, {"completion_tokens", 2}, {"total_tokens", 12}}));
  j = ok(Route::completions, R"({"prompt": "abc", "echo": true, "logprobs": 1})");
  f.reason = FinishReason::length;
  o = json::parse(api->answer(j, f));
  EXPECT_EQ(o["object"], "text_completion");
  EXPECT_EQ(o["choices"][0]["text"], "abcHello");
  EXPECT_EQ(o["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(o["choices"][0]["logprobs"]["tokens"][0], "Hello");
  EXPECT_EQ(o["choices"][0]["logprobs"]["text_offset"][0], 3);
}

TEST_F(ApiTest, NativeStreamSendsTheLastTokenWithTheText) {
  const Job j = ok(Route::generate_stream, R"({"inputs": "abc", "parameters": {"max_new_tokens": 3, "details": true}})");
  StreamWriter w(*api, j);
  std::string out = w.on_token(token(10, "a"));
  out += w.on_token(token(11, "b"));
  EXPECT_EQ(events(out).size(), 2u);
  TokenEvent last = token(12, "c");
  last.last = true;                       // the coordinator marks the token that ends the request
  EXPECT_EQ(w.on_token(last), "");        // held for the finish
  FinishEvent f;
  f.reason = FinishReason::length;
  f.generated_text = "abc";
  f.prompt_tokens = 4;
  f.generated_tokens = 3;
  f.tokens = {token(10, "a"), token(11, "b"), token(12, "c")};
  out += w.on_finish(f);
  const auto ev = events(out);
  ASSERT_EQ(ev.size(), 3u);
  EXPECT_TRUE(ev[0]["generated_text"].is_null());
  EXPECT_TRUE(ev[0]["details"].is_null());
  EXPECT_EQ(ev[0]["token"]["text"], "a");
  EXPECT_EQ(ev[2]["token"]["id"], 12);
  EXPECT_EQ(ev[2]["generated_text"], "abc");
  EXPECT_EQ(ev[2]["details"]["finish_reason"], "length");
  EXPECT_EQ(ev[2]["details"]["generated_tokens"], 3);
  EXPECT_TRUE(ev[2]["details"]["seed"].is_null());
  // a token marked last is held; should another come after all, both are still sent once
  StreamWriter w2(*api, j);
  TokenEvent eos = token(1, "");
  eos.last = true;
  std::string out2 = w2.on_token(eos);
  EXPECT_EQ(out2, "");
  out2 += w2.on_token(token(13, "d"));
  EXPECT_EQ(events(out2).size(), 2u);
  out2 += w2.on_error(ApiError{500, "generation", "boom"});
  const auto ev2 = events(out2);
  ASSERT_EQ(ev2.size(), 3u);
  EXPECT_EQ(ev2[0]["token"]["id"], 1);
  EXPECT_EQ(ev2[2]["error"], "boom");
  EXPECT_EQ(ev2[2]["error_type"], "generation");
}

TEST_F(ApiTest, OpenAIStreamHoldsBackStopSequences) {
  const Job j = ok(Route::chat, R"({"messages": [{"role": "user", "content": "hi"}], "stream": true,
                                     "stream_options": {"include_usage": true}})");
  StreamWriter w(*api, j);
  std::string out = w.on_token(token(10, "Hel"));
  out += w.on_token(token(11, "lo<end"));
  out += w.on_token(token(12, "_of_turn>"));
  FinishEvent f;
  f.reason = FinishReason::stop_sequence;
  f.generated_text = "Hello<end_of_turn>";
  f.stop_at = 5;
  f.prompt_tokens = 9;
  f.generated_tokens = 3;
  out += w.on_finish(f);
  const auto ev = events(out);
  std::string text;
  for (const auto& e : ev)
    if (e.is_object() && !e["choices"].empty()) text += e["choices"][0]["delta"].value("content", "");
  EXPECT_EQ(text, "Hello");
  EXPECT_EQ(ev.front()["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(ev.front()["object"], "chat.completion.chunk");
  ASSERT_GE(ev.size(), 4u);
  EXPECT_EQ(ev[ev.size() - 3]["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(ev[ev.size() - 2]["usage"]["total_tokens"], 12);
  EXPECT_EQ(ev.back(), "[DONE]");
  // completions: text chunks, the finish chunk, then [DONE]
  const Job c = ok(Route::completions, R"({"prompt": "abc", "stream": true, "stop": ["zz"]})");
  StreamWriter wc(*api, c);
  std::string oc = wc.on_token(token(10, "az"));  // "z" may start "zz": held
  EXPECT_EQ(events(oc).size(), 1u);
  EXPECT_EQ(events(oc)[0]["choices"][0]["text"], "a");
  oc += wc.on_token(token(11, "b"));
  f.reason = FinishReason::length;
  f.generated_text = "azb";
  f.stop_at = std::string::npos;
  oc += wc.on_finish(f);
  const auto evc = events(oc);
  std::string ctext;
  for (const auto& e : evc)
    if (e.is_object()) ctext += e["choices"][0]["text"].get<std::string>();
  EXPECT_EQ(ctext, "azb");
  EXPECT_EQ(evc[evc.size() - 2]["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(evc.back(), "[DONE]");
}

TEST_F(ApiTest, ErrorBodies) {
  const Failure f{422, "validation", "`top_k` must be strictly positive", "top_k"};
  EXPECT_EQ(json::parse(Api::error_body(false, f)), (json{{"error", f.message}, {"error_type", "validation"}}));
  const json o = json::parse(Api::error_body(true, f));
  EXPECT_EQ(o["error"]["message"], f.message);
  EXPECT_EQ(o["error"]["type"], "validation");
  EXPECT_EQ(o["error"]["param"], "top_k");
  EXPECT_EQ(o["error"]["code"], 422);
}

TEST_F(ApiTest, TokenizeGivesPiecesAndCharOffsets) {
  auto res = api->tokenize(R"({"inputs": "The keeper wrote 日本"})");
  ASSERT_TRUE(std::holds_alternative<std::string>(res));
  const json o = json::parse(std::get<std::string>(res));
  const auto ids = tok->encode("The keeper wrote 日本");
  ASSERT_EQ(o.size(), ids.size());
  EXPECT_EQ(o[0]["id"], tok->bos_id());
  EXPECT_EQ(o[0]["text"], "<bos>");
  EXPECT_EQ(o[0]["start"], 0);
  EXPECT_EQ(o[0]["stop"], 0);
  EXPECT_EQ(o.back()["stop"], 19);  // characters, not bytes
  for (size_t i = 1; i < o.size(); ++i) EXPECT_EQ(o[i]["start"], o[i - 1]["stop"]);
  auto raw = api->tokenize(R"({"inputs": "The", "add_special_tokens": false})");
  EXPECT_EQ(json::parse(std::get<std::string>(raw)).size(), tok->encode_raw("The").size());
  EXPECT_TRUE(std::holds_alternative<Failure>(api->tokenize("{")));
}
