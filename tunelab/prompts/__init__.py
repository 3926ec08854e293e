"""Prompt specs: typed YAML prompts, rendered to chat messages, with a parser per output type."""

from tunelab.prompts.parsers import (ParseResult, parse_free, parse_json, parse_label, parse_number,
                                     parse_sections)
from tunelab.prompts.render import LAYOUTS, Message
from tunelab.prompts.spec import (CotReasoning, Example, ExampleSource, FreeOutput, JsonOutput, LabelOutput,
                                  NoReasoning, NumberOutput, PromptSpec, SectionsOutput, load_prompt_spec,
                                  spec_from_dict)

__all__ = [
    "CotReasoning", "Example", "ExampleSource", "FreeOutput", "JsonOutput", "LAYOUTS", "LabelOutput", "Message",
    "NoReasoning", "NumberOutput", "ParseResult", "PromptSpec", "SectionsOutput", "load_prompt_spec",
    "parse_free", "parse_json", "parse_label", "parse_number", "parse_sections", "spec_from_dict",
]
