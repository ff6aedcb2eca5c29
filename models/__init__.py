"""GPT-2 and BERT in Flax NNX with softmax, dense-entmax or AdaSplash attention."""

from models.attention import make_attention_fn, set_attention_fn
from models.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel
from models.gpt2 import GPT2Config, GPT2LMHeadModel
from models.hf import from_pretrained, save_pretrained
from models.inspect import attention_maps, attention_sparsity, plot_attention

__all__ = [
    "GPT2Config",
    "GPT2LMHeadModel",
    "BertConfig",
    "BertModel",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "from_pretrained",
    "save_pretrained",
    "make_attention_fn",
    "set_attention_fn",
    "attention_sparsity",
    "attention_maps",
    "plot_attention",
]
