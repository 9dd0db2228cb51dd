from brainenc.data.importers.base import Importer


class GODImporter(Importer):
    name = "god"
