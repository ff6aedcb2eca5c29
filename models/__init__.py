"""GPT-2 and BERT in Flax NNX with softmax, dense-entmax or AdaSplash attention."""

from models.alpha import check_alpha_config
from models.analysis import attention_maps, attention_sparsity, plot_attention
from models.attention import set_attention_fn
from models.attention_fns import ATTENTION_KINDS, make_attention_fn
from models.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel
from models.gpt2 import GPT2Config, GPT2LMHeadModel
from models.hf import from_pretrained, save_pretrained
from models.tokenizer import ByteTokenizer

__all__ = [
    "GPT2Config",
    "GPT2LMHeadModel",
    "BertConfig",
    "BertModel",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "from_pretrained",
    "save_pretrained",
    "ByteTokenizer",
    "ATTENTION_KINDS",
    "check_alpha_config",
    "make_attention_fn",
    "set_attention_fn",
    "attention_sparsity",
    "attention_maps",
    "plot_attention",
]
