"""A put_image that stores nothing, in a module of its own: worker processes import it by name in no time (the
benchmark's own module, run as a script, is __main__ to them, and importing it would cost them its imports)."""


def discard_image(image_id: str, data: bytes) -> bool:
    return True
