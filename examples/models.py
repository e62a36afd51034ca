"""Models for the examples (no torchvision needed).

examples/train.py: a small CNN, a CIFAR-style ResNet-18 and an MLP (``MODELS``).
examples/train_lm.py: ``CharTransformer``, a small causal character-level language model.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class SimpleCNN(nn.Module):
    """Two conv layers and two fully connected ones; any input size (8x8 digits to 32x32 CIFAR)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, num_classes)
        self.dropout = nn.Dropout(0.25)

    def forward(self, x):  # x: (B, C, H, W)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2) if x.shape[-1] >= 16 else F.relu(self.conv2(x))
        x = self.pool(x).flatten(1)  # (B, 1024)
        x = self.dropout(F.relu(self.fc1(x)))
        return self.fc2(x)  # (B, num_classes)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images (3x3 stem, no max-pool), 11.2M parameters for 10 classes."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):  # x: (B, C, H, W)
        x = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))  # (B, num_classes)


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int = 10, hidden: int = 1024, depth: int = 3):
        super().__init__()
        dims = [in_features] + [hidden] * depth
        self.body = nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.body(x.flatten(1)))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x):  # x: (B, T, C)
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)  # 3 x (B, T, C)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2)
                   for z in (q, k, v))  # (B, H, T, C / H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, C / H)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))  # (B, T, C)


class CharTransformer(nn.Module):
    """Causal character-level Transformer LM (after nanoGPT): token + learned position
    embeddings, ``n_layers`` pre-LayerNorm blocks, a final LayerNorm and a linear head.
    About 0.25M parameters with the defaults and a 103-character vocabulary."""

    def __init__(self, vocab_size: int, d_model: int = 96, n_layers: int = 2, n_heads: int = 4,
                 context: int = 64):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.Sequential(*[Block(d_model, n_heads) for _ in range(n_layers)])
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, idx):  # idx: (B, T) int64, T <= context
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the model's context {self.context}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))  # (B, T, C)
        return self.head(self.ln(self.blocks(x)))  # (B, T, vocab)


MODELS = {
    "simple_cnn": lambda shape, classes: SimpleCNN(shape[0], classes),
    "resnet18": lambda shape, classes: ResNet18(shape[0], classes),
    "mlp": lambda shape, classes: MLP(shape[0] * shape[1] * shape[2], classes),
}


def build_model(name: str, input_shape, num_classes: int) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](input_shape, num_classes)


class HFCausalLM(nn.Module):
    """A Hugging Face ``transformers`` causal LM built from a small config (random weights,
    nothing downloaded), called as ``CharTransformer`` is: ``(B, T)`` ids to ``(B, T, vocab)``
    logits. ``transformers`` is a benchmark dependency (``HVD_TOPK_EXTRAS=test,bench
    ./scripts/install.sh``), imported only here."""

    def __init__(self, family: str, vocab_size: int, d_model: int = 96, n_layers: int = 2,
                 n_heads: int = 4, context: int = 64):
        super().__init__()
        try:
            import transformers
        except ImportError:
            raise SystemExit(f"--model {family} needs transformers: HVD_TOPK_EXTRAS=test,bench "
                             "./scripts/install.sh") from None
        if family == "gpt2":  # GPT-2's own defaults otherwise (dropout 0.1, GELU, tied head)
            config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=d_model,
                                             n_layer=n_layers, n_head=n_heads, use_cache=False)
            self.lm = transformers.GPT2LMHeadModel(config)
        elif family == "llama":  # RMSNorm, rotary positions, SwiGLU, grouped-query attention
            config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=d_model,
                                              intermediate_size=(8 * d_model // 3 + 31) // 32 * 32,
                                              num_hidden_layers=n_layers, num_attention_heads=n_heads,
                                              num_key_value_heads=max(1, n_heads // 2),
                                              max_position_embeddings=context, use_cache=False)
            self.lm = transformers.LlamaForCausalLM(config)
        else:
            raise ValueError(f"no Hugging Face family {family!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=x).logits


#: ``examples/train_lm.py --model``: the families of language model it trains.
LM_FAMILIES = ("transformer", "gpt2", "llama")


def build_lm(family: str, vocab_size: int, d_model: int = 96, n_layers: int = 2, n_heads: int = 4,
             context: int = 64) -> nn.Module:
    """A causal LM of ``family`` (``LM_FAMILIES``): this file's ``CharTransformer``, or GPT-2
    or Llama from ``transformers``, all of the same width, depth and context."""
    if family == "transformer":
        return CharTransformer(vocab_size, d_model, n_layers, n_heads, context)
    return HFCausalLM(family, vocab_size, d_model, n_layers, n_heads, context)
