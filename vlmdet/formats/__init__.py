from vlmdet.formats.base import REGISTRY, Box, BoxFormat, ParseResult, get_format

__all__ = ["REGISTRY", "Box", "BoxFormat", "ParseResult", "get_format"]
