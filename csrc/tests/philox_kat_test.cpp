// Philox4x32-10 known-answer vectors (Random123), checked from C++ twice: through the shared
// header directly, and through the ddpm_fast::philox4x32 op as the dispatcher registered it.
// Usage: philox_kat_test path/to/philox4x32_kat.json
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "ddpm_fast/philox.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s philox4x32_kat.json\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[1]);
  if (!in) {
    std::fprintf(stderr, "cannot open %s\n", argv[1]);
    return 2;
  }
  std::stringstream text;
  text << in.rdbuf();
  // Each vector lists counter[4], key[2], output[4] as 8-digit hex strings, in that order.
  const std::string json = text.str();
  const std::regex hex("\"([0-9a-fA-F]{8})\"");
  std::vector<uint32_t> words;
  for (auto it = std::sregex_iterator(json.begin(), json.end(), hex); it != std::sregex_iterator(); ++it)
    words.push_back(static_cast<uint32_t>(std::stoul((*it)[1].str(), nullptr, 16)));
  if (words.empty() || words.size() % 10) {
    std::fprintf(stderr, "expected 10 hex words per vector, found %zu words\n", words.size());
    return 2;
  }
  const int64_t n = static_cast<int64_t>(words.size() / 10);
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("ddpm_fast::philox4x32", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  at::Tensor counter = at::empty({n, 4}, at::kLong), key = at::empty({n, 2}, at::kLong);
  for (int64_t v = 0; v < n; ++v) {
    for (int k = 0; k < 4; ++k) counter[v][k] = static_cast<int64_t>(words[10 * v + k]);
    for (int k = 0; k < 2; ++k) key[v][k] = static_cast<int64_t>(words[10 * v + 4 + k]);
  }
  const at::Tensor from_op = op.call(counter, key);

  int failures = 0;
  for (int64_t v = 0; v < n; ++v) {
    const uint32_t* w = &words[10 * v];
    const ddpm_fast::Words4 r = ddpm_fast::philox4x32_10({w[0], w[1], w[2], w[3]}, w[4], w[5]);
    const uint32_t got[4] = {r.x, r.y, r.z, r.w};
    for (int k = 0; k < 4; ++k) {
      const uint32_t want = w[6 + k];
      const auto op_word = static_cast<uint32_t>(from_op[v][k].item<int64_t>());
      if (got[k] != want || op_word != want) {
        std::fprintf(stderr, "vector %lld word %d: header %08x, op %08x, want %08x\n", static_cast<long long>(v), k,
                     got[k], op_word, want);
        ++failures;
      }
    }
  }
  std::printf("%lld vectors, %d mismatches\n", static_cast<long long>(n), failures);
  return failures ? 1 : 0;
}
