# The OpenSSL 3 API of the TLS transport (_tls.pxi), through includes/openssl_stable.h.
# Names that are macros in OpenSSL (SSL_CTX_set_mode, SSL_set_tlsext_host_name, ...)
# are declared as the functions they behave as.
from libc.stdint cimport uint64_t

cdef extern from "openssl_stable.h" nogil:
    ctypedef struct SSL:
        pass
    ctypedef struct SSL_CTX:
        pass
    ctypedef struct SSL_METHOD:
        pass
    ctypedef struct SSL_CIPHER:
        pass
    ctypedef struct BIO:
        pass
    ctypedef struct X509:
        pass
    ctypedef struct X509_NAME:
        pass
    ctypedef struct X509_NAME_ENTRY:
        pass
    ctypedef struct X509_VERIFY_PARAM:
        pass
    ctypedef struct X509_STORE_CTX:
        pass
    ctypedef struct ASN1_STRING:
        pass
    ctypedef struct GENERAL_NAME:
        pass
    ctypedef struct GENERAL_NAMES:
        pass
    cdef struct stack_st_X509_NAME:
        pass
    ctypedef int (*SSL_verify_cb)(int preverify_ok, X509_STORE_CTX *x509_ctx)

    int TLS1_2_VERSION
    int TLS1_3_VERSION
    int SSL_FILETYPE_PEM
    int SSL_VERIFY_NONE
    int SSL_VERIFY_PEER
    int SSL_VERIFY_FAIL_IF_NO_PEER_CERT
    int SSL_ERROR_NONE
    int SSL_ERROR_SSL
    int SSL_ERROR_WANT_READ
    int SSL_ERROR_WANT_WRITE
    int SSL_ERROR_SYSCALL
    int SSL_ERROR_ZERO_RETURN
    uint64_t SSL_OP_IGNORE_UNEXPECTED_EOF
    uint64_t SSL_OP_NO_COMPRESSION
    uint64_t SSL_OP_NO_RENEGOTIATION
    long SSL_MODE_AUTO_RETRY
    long SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
    long X509_V_OK
    unsigned int X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS
    int NID_commonName
    int NID_subject_alt_name
    int GEN_EMAIL
    int GEN_DNS
    int GEN_IPADD

    # macros over SSL_CTX_ctrl / SSL_ctrl
    long SSL_CTX_set_min_proto_version(SSL_CTX *ctx, int version)
    long SSL_CTX_set_max_proto_version(SSL_CTX *ctx, int version)
    long SSL_CTX_set_mode(SSL_CTX *ctx, long op)
    long SSL_CTX_set_read_ahead(SSL_CTX *ctx, long m)
    long SSL_set_tlsext_host_name(SSL *s, const char *name)

    # libssl
    const SSL_METHOD *TLS_client_method()
    const SSL_METHOD *TLS_server_method()
    SSL_CTX *SSL_CTX_new(const SSL_METHOD *meth)
    void SSL_CTX_free(SSL_CTX *ctx)
    uint64_t SSL_CTX_set_options(SSL_CTX *ctx, uint64_t op)
    void SSL_CTX_set_verify(SSL_CTX *ctx, int mode, SSL_verify_cb callback)
    int SSL_CTX_load_verify_locations(SSL_CTX *ctx, const char *CAfile, const char *CApath)
    int SSL_CTX_set_default_verify_paths(SSL_CTX *ctx)
    int SSL_CTX_use_certificate_chain_file(SSL_CTX *ctx, const char *file)
    int SSL_CTX_use_PrivateKey_file(SSL_CTX *ctx, const char *file, int type)
    int SSL_CTX_check_private_key(const SSL_CTX *ctx)
    int SSL_CTX_set_cipher_list(SSL_CTX *ctx, const char *str)
    int SSL_CTX_set_ciphersuites(SSL_CTX *ctx, const char *str)
    int SSL_CTX_set_num_tickets(SSL_CTX *ctx, size_t num_tickets)
    void SSL_CTX_set_default_read_buffer_len(SSL_CTX *ctx, size_t len)
    stack_st_X509_NAME *SSL_load_client_CA_file(const char *file)
    void SSL_CTX_set_client_CA_list(SSL_CTX *ctx, stack_st_X509_NAME *name_list)
    SSL *SSL_new(SSL_CTX *ctx)
    void SSL_free(SSL *ssl)
    int SSL_set_fd(SSL *s, int fd)
    void SSL_set_connect_state(SSL *s)
    void SSL_set_accept_state(SSL *s)
    int SSL_set1_host(SSL *s, const char *hostname)
    void SSL_set_hostflags(SSL *s, unsigned int flags)
    X509_VERIFY_PARAM *SSL_get0_param(SSL *ssl)
    int SSL_do_handshake(SSL *s)
    BIO *SSL_get_rbio(const SSL *s)
    uint64_t BIO_number_read(BIO *bio)
    int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes)
    int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written)
    int SSL_shutdown(SSL *s)
    int SSL_get_error(const SSL *s, int ret_code)
    int SSL_has_pending(const SSL *s)
    long SSL_get_verify_result(const SSL *ssl)
    const char *SSL_get_version(const SSL *s)
    const SSL_CIPHER *SSL_get_current_cipher(const SSL *s)
    const char *SSL_CIPHER_get_name(const SSL_CIPHER *c)
    X509 *SSL_get1_peer_certificate(const SSL *s)

    # libcrypto
    unsigned long ERR_get_error()
    void ERR_clear_error()
    void ERR_error_string_n(unsigned long e, char *buf, size_t len)
    const char *ERR_reason_error_string(unsigned long e)
    void OPENSSL_free(void *addr)
    int X509_VERIFY_PARAM_set1_ip_asc(X509_VERIFY_PARAM *param, const char *ipasc)
    const char *X509_verify_cert_error_string(long n)
    void X509_free(X509 *a)
    X509_NAME *X509_get_subject_name(const X509 *a)
    int X509_NAME_get_index_by_NID(const X509_NAME *name, int nid, int lastpos)
    X509_NAME_ENTRY *X509_NAME_get_entry(const X509_NAME *name, int loc)
    ASN1_STRING *X509_NAME_ENTRY_get_data(const X509_NAME_ENTRY *ne)
    void *X509_get_ext_d2i(const X509 *x, int nid, int *crit, int *idx)
    void *GENERAL_NAME_get0_value(const GENERAL_NAME *a, int *ptype)
    void GENERAL_NAMES_free(GENERAL_NAMES *a)
    int ASN1_STRING_to_UTF8(unsigned char **out, const ASN1_STRING *inp)
    int ASN1_STRING_length(const ASN1_STRING *x)
    const unsigned char *ASN1_STRING_get0_data(const ASN1_STRING *x)
    int sk_GENERAL_NAME_num(const GENERAL_NAMES *sk)
    GENERAL_NAME *sk_GENERAL_NAME_value(const GENERAL_NAMES *sk, int idx)
