"""Build a tiny, randomly initialised model with MedGemma's architecture, entirely offline.

Why: the real MedGemma 1.5 4B weights are ~8.6 GB, gated, and need a GPU to be useful. Tests, CI and
demo installs still need to run the *real* loading and generation code paths (AutoProcessor,
AutoModelForImageTextToText, the Gemma 3 chat template, image token expansion, the bidirectional
image attention mask, greedy ``generate``). This module writes a ~1 MB model directory with the same
architecture (``Gemma3ForConditionalGeneration`` + SigLIP vision tower at 896 px / patch 14 / 256 image
tokens) but random weights, so its output is meaningless text. Everything it produces is labelled as a
TEST MODEL through the marker file :data:`TEST_MODEL_MARKER`.

Nothing here touches the network: the tokenizer is trained locally with the ``tokenizers`` library.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: Marker file that flags a model directory as the tiny random test model.
TEST_MODEL_MARKER = "scp_node_test_model.json"

#: Gemma's special tokens, in the id order used by the test tokenizer (pad/eos/bos/unk match Gemma's ids 0-3).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)
#: MedGemma 1.5 wraps its thinking trace in these two; like in Gemma's tokenizer they are *not* special.
THINKING_TOKENS: tuple[str, str] = ("<unused94>", "<unused95>")

#: Gemma 3's chat template (the logic of the one shipped with gemma-3 / medgemma checkpoints), written by hand.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}"
    "{%- set role = 'model' -%}"
    "{%- else -%}"
    "{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    "{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)

# A few hundred words so that BPE learns sensible merges for prompts and radiology text.
_CORPUS_WORDS = """
the a an and or of to in on at for with without from by is are was were be been being this that these those
it its there here as not no yes any all some each both either neither more most less least very likely
unlikely may might can could should would will shall please describe review provided above below based
visual evidence image images slice slices series study patient findings impression report normal abnormal
you are an expert radiologist instructor teaching medical students analyzing carefully question answer
chest x ray xray radiograph radiography frontal lateral view pa ap portable supine upright erect
lung lungs pulmonary pleural effusion effusions pneumothorax consolidation opacity opacities airspace disease
atelectasis edema congestion interstitial markings nodule nodules mass masses lesion lesions granuloma
cardiomegaly heart cardiac silhouette size mediastinum mediastinal hilar hila contour contours aorta aortic
tortuous calcification calcified diaphragm hemidiaphragm costophrenic angle angles sharp blunting
bony structures bones rib ribs fracture fractures spine vertebral degenerative changes soft tissue tissues
device devices tube tubes line lines catheter pacemaker sternotomy wires clips surgical postoperative
computed tomography ct mri mr magnetic resonance axial coronal sagittal contrast enhanced noncontrast
enhancement attenuation density hypodense hyperdense hypoattenuating hyperintense hypointense signal
abdomen abdominal pelvis pelvic liver hepatic kidney kidneys renal spleen splenic pancreas pancreatic
gallbladder bladder bowel colon stomach adrenal lymph node nodes lymphadenopathy vessels vascular
brain cerebral cerebellar ventricles ventricular hemorrhage infarct infarction ischemia white matter gray
midline shift skull sinus sinuses orbit orbits head neck wrist knee shoulder hip joint ligament tendon
acute chronic stable unchanged new old prior comparison interval increase increased decrease decreased
small large mild moderate severe focal diffuse bilateral unilateral left right upper lower middle lobe lobes
base bases apex apical anterior posterior medial superior inferior central peripheral
clear well expanded inflated hyperinflated emphysema fibrosis scarring bronchiectasis thickening
pneumonia infection infectious inflammatory malignancy malignant benign tumor cancer metastasis metastatic
cyst cystic solid ground glass ggo centimeter centimeters millimeter mm cm measuring measures
recommend recommended follow up further evaluation clinical correlation suggested consider
identified seen noted present absent visible demonstrated appears appear suggest suggests consistent
within limits unremarkable significant acute cardiopulmonary process evidence of
what where which how why when who teaching example good pathology comment gross enlargement
thought thinking answer final model user system one two three four five six seven eight nine ten
""".split()


def _training_sentences() -> list[str]:
    """Words plus a few prompt-like lines; deterministic so the tokenizer is the same on every machine."""
    sentences = list(_CORPUS_WORDS)
    for i in range(0, len(_CORPUS_WORDS), 9):
        sentences.append(" ".join(_CORPUS_WORDS[i : i + 9]))
    sentences += [
        "Describe this chest X-ray.\n",
        "SLICE 1 SLICE 2 SLICE 3 SLICE 10 SLICE 85\n",
        "No acute cardiopulmonary process.\n\n",
        "FINDINGS: IMPRESSION: 0123456789 .,:;!?()[]{}-+=/%<>'\"",
    ]
    return sentences


def _build_tokenizer():
    """Train a small BPE (byte fallback) and wrap it as the fast ``GemmaTokenizer``.

    Why not a real Gemma tokenizer: it is 33 MB and we cannot download it. The vocabulary layout copies
    Gemma's conventions (▁ for space, byte tokens ``<0xNN>`` as fallback, special tokens as added tokens).
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import GemmaTokenizer
    from transformers.tokenization_utils_base import AddedToken

    trainer_tok = Tokenizer(BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    alphabet = [chr(c) for c in range(32, 127) if chr(c) != " "] + ["▁", "\n"]
    trainer = BpeTrainer(vocab_size=900, min_frequency=1, initial_alphabet=alphabet, show_progress=False)
    trainer_tok.train_from_iterator(_training_sentences(), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]

    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *THINKING_TOKENS):
        vocab[token] = len(vocab)
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if token not in vocab:
            vocab[token] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]

    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        add_bos_token=True,
        add_eos_token=False,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
            "sot_token": "<start_of_turn>",
            "eot_token": "<end_of_turn>",
        },
        model_max_length=131_072,
    )
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS[4:]]},
        replace_extra_special_tokens=False,
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINKING_TOKENS])
    for token in (*SPECIAL_TOKENS, *THINKING_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != vocab[token]:
            raise RuntimeError(f"test tokenizer: {token} did not keep its id")
    return tokenizer


def make_test_model(directory: Path, seed: int = 0) -> Path:
    """Write the tiny random MedGemma-architecture model to ``directory`` and return it.

    The directory loads with ``AutoProcessor.from_pretrained(d, local_files_only=True)`` and
    ``AutoModelForImageTextToText.from_pretrained(d, local_files_only=True)``. The same ``seed`` gives the
    same weights (and therefore the same weights hash) on the same torch version.
    """
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        GenerationConfig,
        SiglipVisionConfig,
    )

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    directory = Path(directory)
    if (directory / "config.json").exists() and not (directory / TEST_MODEL_MARKER).exists():
        raise FileExistsError(
            f"{directory} already holds a model that is not an scp_node test model; "
            "refusing to overwrite it (choose an empty directory)"
        )
    directory.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    vision_config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_channels=3,
        image_size=896,
        patch_size=14,
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    text_config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=1024,  # MedGemma 4B's local window; the 2 layers cover one local and one global layer
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=131_072,
        pad_token_id=ids["<pad>"],
        eos_token_id=ids["<eos>"],
        bos_token_id=ids["<bos>"],
    )
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=256,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    config.architectures = ["Gemma3ForConditionalGeneration"]

    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).to(torch.float32).eval()
    # Gemma initialises the projector to zeros, which would make every image look the same; randomise it.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 1)
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.copy_(torch.randn(proj.shape, generator=generator) * 0.02)
    # Same sampling defaults as the MedGemma checkpoints, so the engine's greedy override is exercised.
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<bos>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
        pad_token_id=ids["<pad>"],
        do_sample=True,
        top_k=64,
        top_p=0.95,
    )
    model.save_pretrained(directory, safe_serialization=True)

    image_processor = Gemma3ImageProcessorPil(
        size={"height": 896, "width": 896},
        resample=2,  # bilinear, as in MedGemma's preprocessor_config.json
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
        do_pan_and_scan=False,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=256,
    )
    processor.save_pretrained(directory)

    marker = {"test_model": True, "created_by": "scp_node make-test-model", "seed": seed}
    (directory / TEST_MODEL_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return directory
