from brainenc.data.importers.base import Importer


class Vim1Importer(Importer):
    name = "vim-1"
