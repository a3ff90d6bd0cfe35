"""The one foreground class. 0 is background (torchvision's convention); COCO files and
submissions use the same id for the category."""

RTS_LABEL = 1
RTS_CATEGORY = {"id": RTS_LABEL, "name": "rts"}
