from brainenc.data.importers.base import Importer


class Algonauts2023Importer(Importer):
    name = "algonauts2023"
