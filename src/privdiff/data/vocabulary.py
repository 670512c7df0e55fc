"""The words privdiff's built-in captions use (the tiny tokenizer makes each one a single token)."""

COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black", "gray",
           "brown", "cyan", "magenta")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
OTHER_WORDS = ("a", "an", "the", "of", "on", "in", "and", "with", "photo", "picture", "image", "drawing",
               "handwritten", "digit", "number", "letter", "capital", "small", "face", "person", "portrait",
               "circle", "filled", "outline", "background", "foreground", "sks", "identity", "object",
               "shape", "dark", "light", "bright", "grayscale", "texture", "pattern")
CAPTION_WORDS: tuple[str, ...] = (OTHER_WORDS + COLOURS + NUMBER_WORDS + tuple("abcdefghijklmnopqrstuvwxyz")
                                  + tuple("0123456789"))
