from brainenc.data.importers.base import Importer


class BOLD5000Importer(Importer):
    name = "bold5000"
